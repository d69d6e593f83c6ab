//! The sweep spec: a TOML file with a `[sweep]` table (method, budget, seed, objective, base
//! config, pruner) and `[[sweep.param]]` entries, one per hyperparameter searched.
//!
//! Every rule is checked when the spec is read, before any training, and each error names the
//! parameter, the field and the rule, so a typo costs seconds rather than a trial.

use crate::model::Config;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// How trials choose their parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every point of the grid (floats need a `step`), in a seeded shuffled order.
    Grid,
    /// Independent uniform (or log-uniform) draws.
    Random,
    /// Tree-structured Parzen Estimator after `n_startup_trials` random trials.
    Tpe,
}

/// What a trial is scored by; lower is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// The validation loss of the trial's last evaluation (at `train.max_steps`).
    ValLoss,
    /// The lowest validation loss over the trial's evaluations.
    BestValLoss,
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Objective::ValLoss => "val_loss",
            Objective::BestValLoss => "best_val_loss",
        })
    }
}

/// The range or set one parameter is searched over.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ParamKind {
    /// A real number in `[low, high]`, log-uniform with `log`, on a grid of `step` if given.
    Float {
        /// Lowest value.
        low: f64,
        /// Highest value.
        high: f64,
        /// Sample the logarithm uniformly (for scale parameters such as a learning rate).
        log: bool,
        /// Spacing of the allowed values from `low` (required by grid search).
        step: Option<f64>,
    },
    /// An integer in `[low, high]`, every `step` from `low`.
    Int {
        /// Lowest value.
        low: i64,
        /// Highest value.
        high: i64,
        /// Sample the logarithm uniformly.
        log: bool,
        /// Spacing of the allowed values from `low`.
        step: i64,
    },
    /// One of a list of values (numbers, strings or booleans).
    Choice {
        /// The values.
        values: Vec<toml::Value>,
    },
}

/// One searched hyperparameter.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ParamSpec {
    /// The config key it sets, `section.key` (e.g. `train.lr`).
    pub key: String,
    /// Its range.
    #[serde(flatten)]
    pub kind: ParamKind,
}

/// The median pruner's settings (Optuna's `MedianPruner`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct PrunerSpec {
    /// Never prune before this many trials have completed.
    pub n_startup_trials: usize,
    /// Never prune at evaluations before this step.
    pub n_warmup_steps: u64,
}

/// A parsed and checked sweep spec.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SweepSpec {
    /// Search method.
    pub method: Method,
    /// Trial budget (for grid search, capped at the grid's size).
    pub trials: usize,
    /// Seed of the sampler (trials keep the base config's `train.seed`).
    pub seed: u64,
    /// What the trials are ranked by.
    pub objective: Objective,
    /// Random trials before TPE models the results.
    pub n_startup_trials: usize,
    /// The median pruner, or `None` for no pruning.
    pub pruner: Option<PrunerSpec>,
    /// The searched parameters, in file order.
    pub params: Vec<ParamSpec>,
    /// The base config as TOML text (the file's, with the inline `[base]` table on top).
    pub base_toml: String,
    /// The base config, parsed and validated.
    #[serde(skip)]
    pub base: Config,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    sweep: RawSweep,
    #[serde(default)]
    base: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    method: String,
    trials: Option<i64>,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_objective")]
    objective: String,
    base: Option<String>,
    n_startup_trials: Option<i64>,
    pruner: Option<RawPruner>,
    #[serde(default)]
    param: Vec<RawParam>,
}

fn default_objective() -> String {
    "val_loss".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPruner {
    kind: String,
    n_startup_trials: Option<i64>,
    n_warmup_steps: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    key: String,
    kind: String,
    low: Option<toml::Value>,
    high: Option<toml::Value>,
    #[serde(default)]
    log: bool,
    step: Option<toml::Value>,
    values: Option<Vec<toml::Value>>,
}

/// Optuna's default for TPE is 10 start-up trials; sweeps of kiln's models are a dozen trials, so
/// the default here is 5, leaving TPE most of the budget.
const DEFAULT_STARTUP: usize = 5;

/// The largest grid accepted: more points than any sweep of kiln's could run.
const MAX_GRID: usize = 100_000;

fn bad(param: &str, field: &str, value: impl std::fmt::Display, rule: &str) -> Error {
    Error::invalid(format!("sweep.param {param:?}: {field}"), value, rule)
}

fn as_f64(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Float(f) => Some(*f),
        toml::Value::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

impl SweepSpec {
    /// Reads a spec file; a relative `base` path is taken from the spec's folder.
    pub fn load(path: &Path) -> Result<SweepSpec> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        SweepSpec::parse(&text, dir).map_err(|e| match e {
            Error::Config { message } => Error::Config {
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// Parses spec text; `dir` is where a relative `base` path starts.
    pub fn parse(text: &str, dir: &Path) -> Result<SweepSpec> {
        let raw: RawFile = toml::from_str(text).map_err(|e| Error::Config {
            message: format!("sweep spec: {}", e.to_string().trim()),
        })?;
        let s = raw.sweep;
        let method = match s.method.as_str() {
            "grid" => Method::Grid,
            "random" => Method::Random,
            "tpe" | "bayes" => Method::Tpe,
            other => {
                return Err(Error::invalid(
                    "sweep.method",
                    format!("{other:?}"),
                    "must be \"grid\", \"random\" or \"tpe\" (also spelt \"bayes\")",
                ));
            }
        };
        let objective = match s.objective.as_str() {
            "val_loss" => Objective::ValLoss,
            "best_val_loss" => Objective::BestValLoss,
            other => {
                return Err(Error::invalid(
                    "sweep.objective",
                    format!("{other:?}"),
                    "must be \"val_loss\" (the last evaluation's) or \"best_val_loss\" (the \
                     lowest of the trial's evaluations); lower is better",
                ));
            }
        };
        let n_startup_trials = match s.n_startup_trials {
            None => DEFAULT_STARTUP,
            Some(n) if n >= 1 => n as usize,
            Some(n) => {
                return Err(Error::invalid(
                    "sweep.n_startup_trials",
                    n,
                    "must be at least 1 (TPE needs results to model)",
                ));
            }
        };
        let pruner = match s.pruner {
            None => None,
            Some(p) => match p.kind.as_str() {
                "none" => None,
                "median" => {
                    let startup = p.n_startup_trials.unwrap_or(DEFAULT_STARTUP as i64);
                    if startup < 1 {
                        return Err(Error::invalid(
                            "sweep.pruner.n_startup_trials",
                            startup,
                            "must be at least 1 (the median of no completed trials is undefined)",
                        ));
                    }
                    let warmup = p.n_warmup_steps.unwrap_or(0);
                    if warmup < 0 {
                        return Err(Error::invalid(
                            "sweep.pruner.n_warmup_steps",
                            warmup,
                            "must be 0 or more",
                        ));
                    }
                    Some(PrunerSpec {
                        n_startup_trials: startup as usize,
                        n_warmup_steps: warmup as u64,
                    })
                }
                other => {
                    return Err(Error::invalid(
                        "sweep.pruner.kind",
                        format!("{other:?}"),
                        "must be \"median\" or \"none\"",
                    ));
                }
            },
        };
        let base_toml = base_table(s.base.as_deref(), raw.base, dir)?;
        let base =
            Config::from_toml(&base_toml, &[]).map_err(|e| prefix(e, "sweep base config"))?;
        if s.param.is_empty() {
            return Err(Error::invalid(
                "sweep.param",
                "(none)",
                "give at least one [[sweep.param]] with a key and a kind",
            ));
        }
        let mut params: Vec<ParamSpec> = Vec::new();
        for p in s.param {
            let spec = check_param(p, method)?;
            if params.iter().any(|q| q.key == spec.key) {
                return Err(bad(
                    &spec.key,
                    "key",
                    &spec.key,
                    "is searched twice; give each config key one [[sweep.param]]",
                ));
            }
            check_values_apply(&base_toml, &spec)?;
            params.push(spec);
        }
        let trials = match (s.trials, method) {
            (Some(n), _) if n < 1 => {
                return Err(Error::invalid(
                    "sweep.trials",
                    n,
                    "must be at least 1 (the trial budget)",
                ));
            }
            (Some(n), _) => n as usize,
            (None, Method::Grid) => usize::MAX,
            (None, _) => {
                return Err(Error::invalid(
                    "sweep.trials",
                    "(none)",
                    "give the trial budget (random and tpe have no natural end)",
                ));
            }
        };
        let mut spec = SweepSpec {
            method,
            trials,
            seed: s.seed,
            objective,
            n_startup_trials,
            pruner,
            params,
            base_toml,
            base,
        };
        if method == Method::Grid {
            let size = super::sampler::grid_size(&spec.params)
                .filter(|&n| n <= MAX_GRID)
                .ok_or_else(|| {
                    Error::invalid(
                        "sweep.param",
                        "(the grid)",
                        format!(
                            "the grid has more than {MAX_GRID} points; use larger steps, fewer                              values or parameters, or method = \"random\" or \"tpe\""
                        ),
                    )
                })?;
            spec.trials = spec.trials.min(size);
        }
        Ok(spec)
    }

    /// A fingerprint of everything that decides which trials run and what they mean (all but the
    /// budget, which a resumed sweep may raise): a resumed sweep must be the same search.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "method": self.method,
            "seed": self.seed,
            "objective": self.objective,
            "n_startup_trials": self.n_startup_trials,
            "pruner": self.pruner,
            "params": self.params,
            "base": self.base_toml,
        })
    }
}

fn prefix(e: Error, what: &str) -> Error {
    match e {
        Error::Config { message } => Error::Config {
            message: format!("{what}: {message}"),
        },
        other => other,
    }
}

/// The base config's TOML: the file named by `sweep.base` (if any) with the `[base]` table's
/// sections merged on top, key by key.
fn base_table(path: Option<&str>, inline: Option<toml::Table>, dir: &Path) -> Result<String> {
    let mut table = match path {
        Some(p) => {
            let full: PathBuf = dir.join(p);
            let text = std::fs::read_to_string(&full).map_err(|e| {
                Error::invalid(
                    "sweep.base",
                    format!("{p:?}"),
                    format!(
                        "cannot be read as {} ({e}); give a config path relative to the spec \
                         file, or an inline [base] table",
                        full.display()
                    ),
                )
            })?;
            toml::from_str::<toml::Table>(&text).map_err(|e| Error::Config {
                message: format!("{}: {}", full.display(), e.to_string().trim()),
            })?
        }
        None => toml::Table::new(),
    };
    for (section, value) in inline.unwrap_or_default() {
        match (table.get_mut(&section), value) {
            (Some(toml::Value::Table(old)), toml::Value::Table(new)) => old.extend(new),
            (_, value) => {
                table.insert(section, value);
            }
        }
    }
    toml::to_string(&table).map_err(|e| Error::Config {
        message: format!("sweep base config: {e}"),
    })
}

fn check_param(p: RawParam, method: Method) -> Result<ParamSpec> {
    let key = p.key.trim().to_string();
    if !is_config_key(&key) {
        return Err(bad(
            &key,
            "key",
            format!("{key:?}"),
            "is not a config key; use section.key as in a config file, e.g. \"train.lr\" or \
             \"model.n_layer\"",
        ));
    }
    let k = key.as_str();
    let kind = match p.kind.as_str() {
        "float" => {
            let get = |field: &str, v: &Option<toml::Value>| -> Result<f64> {
                let v = v
                    .as_ref()
                    .ok_or_else(|| bad(k, field, "(none)", "a float range needs low and high"))?;
                as_f64(v)
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad(k, field, v, "must be a finite number"))
            };
            let (low, high) = (get("low", &p.low)?, get("high", &p.high)?);
            let step = match &p.step {
                None => None,
                Some(v) => Some(
                    as_f64(v)
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| bad(k, "step", v, "must be a number > 0"))?,
                ),
            };
            if p.values.is_some() {
                return Err(bad(k, "values", "[..]", "belongs to kind = \"choice\""));
            }
            check_range(k, low, high, p.log)?;
            if p.log && step.is_some() {
                return Err(bad(
                    k,
                    "step",
                    step.unwrap_or_default(),
                    "cannot be combined with log = true (a grid of evenly spaced values is \
                     not log-spaced); list log-spaced values with kind = \"choice\"",
                ));
            }
            if method == Method::Grid && step.is_none() {
                return Err(bad(
                    k,
                    "step",
                    "(none)",
                    "grid search needs a finite grid: give a step, or list the values with \
                     kind = \"choice\"",
                ));
            }
            ParamKind::Float {
                low,
                high,
                log: p.log,
                step,
            }
        }
        "int" => {
            let get = |field: &str, v: &Option<toml::Value>| -> Result<i64> {
                let v = v
                    .as_ref()
                    .ok_or_else(|| bad(k, field, "(none)", "an int range needs low and high"))?;
                v.as_integer()
                    .ok_or_else(|| bad(k, field, v, "must be an integer"))
            };
            let (low, high) = (get("low", &p.low)?, get("high", &p.high)?);
            let step = match &p.step {
                None => 1,
                Some(v) => v
                    .as_integer()
                    .filter(|s| *s >= 1)
                    .ok_or_else(|| bad(k, "step", v, "must be an integer ≥ 1"))?,
            };
            if p.values.is_some() {
                return Err(bad(k, "values", "[..]", "belongs to kind = \"choice\""));
            }
            check_range(k, low as f64, high as f64, p.log)?;
            if p.log && step != 1 {
                return Err(bad(k, "step", step, "cannot be combined with log = true"));
            }
            ParamKind::Int {
                low,
                high,
                log: p.log,
                step,
            }
        }
        "choice" => {
            for (field, present) in [
                ("low", p.low.is_some()),
                ("high", p.high.is_some()),
                ("step", p.step.is_some()),
                ("log", p.log),
            ] {
                if present {
                    return Err(bad(
                        k,
                        field,
                        "(given)",
                        "belongs to kind = \"float\" or \"int\"; a choice has only values",
                    ));
                }
            }
            let values = p.values.unwrap_or_default();
            if values.is_empty() {
                return Err(bad(
                    k,
                    "values",
                    "[]",
                    "a choice needs at least one value, e.g. values = [2, 4, 6]",
                ));
            }
            for (i, v) in values.iter().enumerate() {
                if values[..i].contains(v) {
                    return Err(bad(k, "values", v, "is listed twice"));
                }
                if matches!(v, toml::Value::Table(_) | toml::Value::Array(_)) {
                    return Err(bad(k, "values", v, "must be numbers, strings or booleans"));
                }
            }
            ParamKind::Choice { values }
        }
        other => {
            return Err(bad(
                k,
                "kind",
                format!("{other:?}"),
                "must be \"float\", \"int\" or \"choice\"",
            ));
        }
    };
    Ok(ParamSpec { key, kind })
}

fn check_range(k: &str, low: f64, high: f64, log: bool) -> Result<()> {
    if low > high {
        return Err(bad(
            k,
            "low",
            low,
            &format!("must not exceed high = {high} (the range is empty)"),
        ));
    }
    if log && low <= 0.0 {
        return Err(bad(
            k,
            "low",
            low,
            "a log range must be > 0 (its logarithm is sampled); raise low or drop log = true",
        ));
    }
    Ok(())
}

/// Whether `key` names a field of [`Config`] (`section.key`).
fn is_config_key(key: &str) -> bool {
    let Some((section, field)) = key.split_once('.') else {
        return false;
    };
    let Ok(toml::Value::Table(t)) = toml::Value::try_from(Config::default()) else {
        return false;
    };
    t.get(section)
        .and_then(|s| s.as_table())
        .is_some_and(|s| s.contains_key(field))
}

/// Applies the range's ends (or every choice) to the base config, so that a value the config
/// refuses (a float for an integer key, n_head = 3 with n_embd = 128) fails here and not in the
/// middle of the sweep.
fn check_values_apply(base: &str, p: &ParamSpec) -> Result<()> {
    let values: Vec<toml::Value> = match &p.kind {
        ParamKind::Float { low, high, .. } => {
            vec![toml::Value::Float(*low), toml::Value::Float(*high)]
        }
        ParamKind::Int { low, high, .. } => {
            vec![toml::Value::Integer(*low), toml::Value::Integer(*high)]
        }
        ParamKind::Choice { values } => values.clone(),
    };
    for v in values {
        let o = format!("{}={v}", p.key);
        if let Err(e) = Config::from_toml(base, &[o]) {
            let why = match e {
                Error::Invalid { key, value, rule } => format!("{key} = {value}: {rule}"),
                other => other.to_string(),
            };
            return Err(bad(
                &p.key,
                "value",
                &v,
                &format!("is refused by the base config ({why})"),
            ));
        }
    }
    Ok(())
}
