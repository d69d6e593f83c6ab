//! The samplers on a cheap synthetic objective (no training): TPE against random search, grid
//! coverage, and determinism under a seed.

use kiln::sweep::journal::{TrialRecord, TrialState};
use kiln::sweep::sampler::{Point, suggest, to_json};
use kiln::sweep::spec::SweepSpec;
use std::collections::HashSet;
use std::path::Path;

/// A search space shaped like a real one: a log-scale learning rate, an integer warm-up, a
/// depth choice and a dropout, with a config base the values are checked against.
fn spec(method: &str, seed: u64, extra: &str) -> SweepSpec {
    let text = format!(
        r#"
[sweep]
method = "{method}"
trials = 20
seed = {seed}
n_startup_trials = 5
{extra}

[base.train]
min_lr = 1e-6

[[sweep.param]]
key = "train.lr"
kind = "float"
low = 1e-5
high = 1e-1
log = true

[[sweep.param]]
key = "train.warmup_steps"
kind = "int"
low = 0
high = 200

[[sweep.param]]
key = "model.n_layer"
kind = "choice"
values = [2, 4, 6, 8]

[[sweep.param]]
key = "model.dropout"
kind = "float"
low = 0.0
high = 0.5
"#
    );
    SweepSpec::parse(&text, Path::new(".")).unwrap_or_else(|e| panic!("{e}"))
}

/// A loss surface with its minimum (0.0) at lr 3e-3, warm-up 60, 4 layers, dropout 0.1: a bowl
/// in log10(lr) (the dominant term, as in practice), gentler terms for the others.
fn objective(p: &Point) -> f64 {
    let lr = p[0].as_float().unwrap();
    let warmup = p[1].as_integer().unwrap() as f64;
    let layers = p[2].as_integer().unwrap();
    let dropout = p[3].as_float().unwrap();
    let depth = match layers {
        2 => 0.3,
        4 => 0.0,
        6 => 0.1,
        _ => 0.4,
    };
    (lr.log10() - 3e-3f64.log10()).powi(2)
        + ((warmup - 60.0) / 100.0).powi(2)
        + depth
        + 2.0 * (dropout - 0.1).powi(2)
}

/// Runs `spec.trials` trials of the synthetic objective; returns the points and the best value.
fn run(spec: &SweepSpec) -> (Vec<Point>, f64) {
    let mut history: Vec<TrialRecord> = Vec::new();
    let mut points = Vec::new();
    for n in 0..spec.trials {
        let p = suggest(spec, n, &history);
        let value = objective(&p);
        history.push(TrialRecord {
            number: n,
            params: spec
                .params
                .iter()
                .zip(&p)
                .map(|(s, v)| (s.key.clone(), to_json(v)))
                .collect(),
            state: TrialState::Complete,
            value: Some(value),
            reports: Vec::new(),
            steps: 0,
            seconds: 0.0,
            error: None,
        });
        points.push(p);
    }
    let best = history
        .iter()
        .filter_map(|t| t.value)
        .fold(f64::INFINITY, f64::min);
    (points, best)
}

#[test]
fn tpe_beats_random_search_on_average_over_ten_seeds() {
    let (mut tpe, mut random, mut wins) = (0.0, 0.0, 0);
    for seed in 0..10 {
        let (_, t) = run(&spec("tpe", seed, ""));
        let (_, r) = run(&spec("random", seed, ""));
        eprintln!("seed {seed}: best of 20, tpe {t:.4}, random {r:.4}");
        tpe += t / 10.0;
        random += r / 10.0;
        wins += usize::from(t < r);
    }
    eprintln!(
        "mean best of 20 trials: tpe {tpe:.4}, random {random:.4}; tpe better on {wins}/10 seeds"
    );
    // The claim of the issue: a better mean best value within the same 20 trials. No margin is
    // asked for; the printout shows the size of the difference.
    assert!(tpe < random, "tpe {tpe} vs random {random}");
}

#[test]
fn same_seed_same_trials_and_each_trial_depends_only_on_the_history() {
    let s = spec("tpe", 7, "");
    let (a, _) = run(&s);
    let (b, _) = run(&s);
    assert_eq!(
        a, b,
        "a second run with the same seed proposes the same trials"
    );
    let (c, _) = run(&spec("tpe", 8, ""));
    assert_ne!(a, c, "another seed proposes other trials");
}

#[test]
fn grid_covers_its_grid_exactly_once() {
    let text = r#"
[sweep]
method = "grid"
seed = 3

[[sweep.param]]
key = "train.lr"
kind = "float"
low = 0.001
high = 0.003
step = 0.001

[[sweep.param]]
key = "model.n_layer"
kind = "int"
low = 2
high = 6
step = 2

[[sweep.param]]
key = "data.tokenizer"
kind = "choice"
values = ["char", "bpe"]
"#;
    let s = SweepSpec::parse(text, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        s.trials,
        3 * 3 * 2,
        "without a budget, grid runs its whole grid"
    );
    let seen: Vec<String> = (0..s.trials)
        .map(|n| format!("{:?}", suggest(&s, n, &[])))
        .collect();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 18, "no point twice: {seen:?}");
    let mut expected = HashSet::new();
    for lr in [0.001, 0.002, 0.003] {
        for layers in [2i64, 4, 6] {
            for tok in ["char", "bpe"] {
                expected.insert(format!(
                    "{:?}",
                    vec![
                        toml::Value::Float(lr),
                        toml::Value::Integer(layers),
                        toml::Value::String(tok.into())
                    ]
                ));
            }
        }
    }
    assert_eq!(unique, expected.iter().collect(), "exactly the grid");
    // A larger budget is capped at the grid.
    let capped = SweepSpec::parse(
        &text.replace("seed = 3", "seed = 3\ntrials = 100"),
        Path::new("."),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(capped.trials, 18);
}
