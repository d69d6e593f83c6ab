//! Choosing a trial's parameters: grid, random, or TPE ([`super::tpe`]).
//!
//! Every choice is a pure function of the spec, the trial number and the finished trials, with a
//! generator seeded per (sweep seed, trial, parameter): a resumed sweep proposes what an
//! uninterrupted one would have, and TPE's random start-up trials are exactly random search's
//! trials with the same seed.

use super::journal::{TrialRecord, TrialState};
use super::spec::{Method, ParamKind, ParamSpec, SweepSpec};
use super::tpe;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

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

/// A config value as JSON, for the journal.
pub fn to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Where a numeric parameter is modelled: `[a, b]`, in logarithms for a log range. An integer
/// range is widened by half a step on each side, so its end values are as likely as the others.
fn internal_range(p: &ParamSpec) -> Option<(f64, f64, bool)> {
    match &p.kind {
        ParamKind::Float { low, high, log, .. } if *log => Some((low.ln(), high.ln(), true)),
        ParamKind::Float { low, high, .. } => Some((*low, *high, false)),
        ParamKind::Int {
            low,
            high,
            log,
            step,
        } => {
            let half = *step as f64 / 2.0;
            let (a, b) = (*low as f64 - half, *high as f64 + half);
            // A log range has low ≥ 1 (checked in the spec), so low - 1/2 > 0.
            Some(if *log {
                (a.ln(), b.ln(), true)
            } else {
                (a, b, false)
            })
        }
        ParamKind::Choice { .. } => None,
    }
}

/// A config value of a numeric parameter, in its modelling space.
fn to_internal(p: &ParamSpec, v: &serde_json::Value) -> Option<f64> {
    let (_, _, log) = internal_range(p)?;
    let x = v.as_f64()?;
    Some(if log { x.ln() } else { x })
}

/// A point of the modelling space as the parameter's config value: snapped to its step,
/// rounded to four significant digits (all a sweep can tell apart, and readable in best.toml)
/// and kept in range.
fn from_internal(p: &ParamSpec, x: f64) -> toml::Value {
    let log = internal_range(p).is_some_and(|r| r.2);
    let v = if log { x.exp() } else { x };
    match &p.kind {
        ParamKind::Float {
            low, high, step, ..
        } => {
            let v = match step {
                Some(s) => tidy(low + ((v - low) / s).round() * s),
                None => format!("{v:.3e}").parse().unwrap_or(v),
            };
            toml::Value::Float(v.clamp(*low, *high))
        }
        ParamKind::Int {
            low, high, step, ..
        } => {
            let k = ((v - *low as f64) / *step as f64).round().max(0.0) as i64;
            toml::Value::Integer((low + k * step).clamp(*low, *high))
        }
        ParamKind::Choice { values } => values[0].clone(),
    }
}

/// The index of a choice parameter's value.
fn choice_index(p: &ParamSpec, v: &serde_json::Value) -> Option<usize> {
    match &p.kind {
        ParamKind::Choice { values } => values.iter().position(|c| to_json(c) == *v),
        _ => None,
    }
}

/// A uniform draw (log-uniform for a log range).
fn random_value(p: &ParamSpec, rng: &mut StdRng) -> toml::Value {
    match (&p.kind, internal_range(p)) {
        (ParamKind::Choice { values }, _) => values[rng.random_range(0..values.len())].clone(),
        (_, Some((a, b, _))) => from_internal(p, a + (b - a) * rng.random::<f64>()),
        (_, None) => unreachable_value(p),
    }
}

/// The low end of a range; only reached if a numeric parameter had no range, which
/// [`internal_range`] rules out.
fn unreachable_value(p: &ParamSpec) -> toml::Value {
    match &p.kind {
        ParamKind::Float { low, .. } => toml::Value::Float(*low),
        ParamKind::Int { low, .. } => toml::Value::Integer(*low),
        ParamKind::Choice { values } => values[0].clone(),
    }
}

/// What TPE learns from: each finished trial with a value (COMPLETE, and PRUNED with the best
/// loss it reported, which ranks it among the bad ones since it was pruned for being worse than
/// the median), as Optuna's TPE does. FAIL trials carry no value.
fn scored(history: &[TrialRecord]) -> Vec<(&TrialRecord, f64)> {
    let mut v: Vec<(&TrialRecord, f64)> = history
        .iter()
        .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
        .filter_map(|t| t.value.filter(|v| v.is_finite()).map(|v| (t, v)))
        .collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.number.cmp(&b.0.number)));
    v
}

/// The parameters of trial `number`, given the trials finished so far.
pub fn suggest(spec: &SweepSpec, number: usize, history: &[TrialRecord]) -> Point {
    if spec.method == Method::Grid {
        let points = grid(&spec.params, spec.seed);
        return points[number % points.len()].clone();
    }
    let scored = scored(history);
    let model = spec.method == Method::Tpe && scored.len() >= spec.n_startup_trials.max(2);
    let (good, bad) = scored.split_at(if model { tpe::n_good(scored.len()) } else { 0 });
    spec.params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut rng = tpe::rng(spec.seed, number, i);
            if !model {
                return random_value(p, &mut rng);
            }
            match (&p.kind, internal_range(p)) {
                (ParamKind::Choice { values }, _) => {
                    let idx = |ts: &[(&TrialRecord, f64)]| -> Vec<usize> {
                        ts.iter()
                            .filter_map(|(t, _)| choice_index(p, t.params.get(&p.key)?))
                            .collect()
                    };
                    let c = tpe::propose_choice(&mut rng, values.len(), &idx(good), &idx(bad));
                    values[c].clone()
                }
                (_, Some((a, b, _))) => {
                    let xs = |ts: &[(&TrialRecord, f64)]| -> Vec<f64> {
                        ts.iter()
                            .filter_map(|(t, _)| to_internal(p, t.params.get(&p.key)?))
                            .collect()
                    };
                    from_internal(
                        p,
                        tpe::propose_continuous(&mut rng, a, b, &xs(good), &xs(bad)),
                    )
                }
                (_, None) => unreachable_value(p),
            }
        })
        .collect()
}
