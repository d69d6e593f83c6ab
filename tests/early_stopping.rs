//! Early stopping: a tiny model on a corpus whose validation split contradicts part of what the
//! training split teaches, so the validation loss falls, then rises. The run must stop exactly
//! where the patience rule says on the logged losses, `best` must name the lowest validation
//! loss and survive pruning, a resume must continue the patience count, and bad settings must be
//! clear errors.

#[path = "common/run.rs"]
mod run;

use kiln::train::checkpoint;
use kiln::{
    Config, Dataset, EvalSet, EvalStats, FitOptions, Gpu, GpuOptions, Observer, PrecisionChoice,
    Trainer,
};
use std::path::Path;

const PATIENCE: usize = 3;
const EVAL_INTERVAL: u64 = 5;
const MAX_STEPS: u64 = 300;

fn config(extra: &[&str]) -> Config {
    let mut overrides: Vec<String> = [
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=16",
        "train.batch_size=4",
        "train.warmup_steps=3",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.eval_batches=3",
        "train.checkpoint_interval=5",
        "train.precision=\"f32\"",
        "data.val_fraction=0.2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    overrides.push(format!("train.max_steps={MAX_STEPS}"));
    overrides.push(format!("train.eval_interval={EVAL_INTERVAL}"));
    overrides.push(format!("train.early_stopping_patience={PATIENCE}"));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    Config::from_toml("", &overrides).unwrap()
}

/// Lines of `x` runs ending in `abcd` in the training split (the first 80%); in the validation
/// split (the last 20%) one line in three ends in `dcba` instead. Learning the runs and `abcd`
/// first lowers the validation loss; once the model is sure of `abcd` it is confidently wrong on
/// the `dcba` lines and the validation loss rises.
fn overfitting_text() -> String {
    let line = |tail: &str, i: usize| format!("{}{tail}\n", "x".repeat(6 + i % 5));
    let train: String = (0..400).map(|i| line("abcd", i)).collect();
    let val: String = (0..100)
        .map(|i| line(if i % 3 == 0 { "dcba" } else { "abcd" }, i))
        .collect();
    train + &val
}

fn dataset(c: &Config) -> Dataset {
    Dataset::from_text(&overfitting_text(), &c.data, c.model.block_size).unwrap()
}

fn gpu() -> Gpu {
    Gpu::with_options(&GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    })
    .unwrap()
}

fn trainer(c: &Config) -> Trainer {
    Trainer::new(gpu(), c.clone(), dataset(c)).unwrap()
}

/// Records the periodic evaluations.
#[derive(Default)]
struct Evals(Vec<(u64, f64)>);

impl Observer for Evals {
    fn on_eval(&mut self, e: &EvalStats) -> kiln::Result<kiln::Control> {
        if e.set == EvalSet::Periodic {
            self.0.push((e.step, e.loss));
        }
        Ok(kiln::Control::Continue)
    }
}

/// Where the rule stops, replayed on the logged losses: the step of the evaluation that makes
/// `PATIENCE` in a row not below the best so far (min_delta 0), and the best step.
fn expected_stop(evals: &[(u64, f64)]) -> (Option<u64>, u64) {
    let (mut best, mut best_step, mut bad) = (f64::INFINITY, 0, 0);
    for &(step, loss) in evals {
        if loss < best {
            (best, best_step, bad) = (loss, step, 0);
        } else {
            bad += 1;
            if bad == PATIENCE {
                return (Some(step), best_step);
            }
        }
    }
    (None, best_step)
}

fn pointer(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_run_stops_at_the_patience_and_best_names_the_lowest_loss() {
    let dir = run::tempdir("early-stop");
    let c = config(&[]);
    let mut t = trainer(&c);
    let mut evals = Evals::default();
    let options = FitOptions {
        checkpoint_dir: Some(&dir),
        ..FitOptions::default()
    };
    let summary = t.fit(&options, &mut [&mut evals]).unwrap();
    let (stop, best_step) = expected_stop(&evals.0);
    let stop = stop.expect("the validation loss never rose: the corpus did not overfit");
    let early = summary
        .early_stop
        .expect("the run did not report early stopping");
    assert!(stop < MAX_STEPS, "stopped at {stop}, not early");
    assert_eq!(summary.steps, stop, "evaluations: {:?}", evals.0);
    assert_eq!(early.step, stop);
    assert_eq!(early.evals_without_improvement as usize, PATIENCE);
    assert_eq!(early.best_step, best_step);
    // The evaluation after the stop's was never run.
    assert_eq!(evals.0.last().unwrap().0, stop);
    let lowest = evals.0.iter().map(|e| e.1).fold(f64::INFINITY, f64::min);
    assert_eq!(early.best_val_loss, lowest);
    assert!(
        best_step > EVAL_INTERVAL,
        "the loss never fell first, so this does not show `best` tracking the minimum: {:?}",
        evals.0
    );

    // `best` names the best step although more than 3 (the kept number) checkpoints followed it.
    assert_eq!(pointer(&dir, "best"), format!("step-{best_step}"));
    assert_eq!(pointer(&dir, "latest"), format!("step-{stop}"));
    assert!((stop - best_step) / EVAL_INTERVAL >= checkpoint::DEFAULT_KEEP as u64);
    let folders = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("step-")
        })
        .count();
    assert_eq!(
        folders,
        checkpoint::DEFAULT_KEEP + 1,
        "the newest 3 and the best"
    );
    let best = checkpoint::resolve(&dir.join("best")).unwrap();
    assert_eq!(best, dir.join(format!("step-{best_step}")));
    let ck = checkpoint::load(&best).unwrap();
    assert_eq!(ck.state.step, best_step);
    assert_eq!(ck.state.best_val_loss, Some(lowest));
    assert_eq!(
        checkpoint::resolve(&dir.join("latest")).unwrap(),
        dir.join(format!("step-{stop}"))
    );
    // The checkpoint the best one names scores the lowest loss again when loaded.
    let mut again = Trainer::from_checkpoint(gpu(), c.clone(), dataset(&c), ck).unwrap();
    assert_eq!(again.evaluate(EvalSet::Periodic).unwrap().loss, lowest);
}

#[test]
fn a_resumed_run_keeps_its_patience_count() {
    let c = config(&[]);
    let whole_dir = run::tempdir("early-stop-whole");
    let mut whole = trainer(&c);
    let mut evals = Evals::default();
    let options = FitOptions {
        checkpoint_dir: Some(&whole_dir),
        ..FitOptions::default()
    };
    let expected = whole.fit(&options, &mut [&mut evals]).unwrap();
    let expected = expected.early_stop.expect("no early stop");
    // Interrupt at the evaluation just before the stop: its count is PATIENCE − 1, which a
    // resume that forgot it would have to rebuild from 0, stopping PATIENCE − 1 evaluations late.
    let interrupt = expected.step - EVAL_INTERVAL;

    let dir = run::tempdir("early-stop-resume");
    let mut first = trainer(&c);
    let options = FitOptions {
        checkpoint_dir: Some(&dir),
        stop_after: Some(interrupt),
        ..FitOptions::default()
    };
    let s = first.fit(&options, &mut []).unwrap();
    assert_eq!(s.steps, interrupt);
    assert!(s.early_stop.is_none());
    drop(first);
    let saved = checkpoint::load_latest(&dir).unwrap();
    assert_eq!(saved.state.evals_without_improvement as usize, PATIENCE - 1);

    let mut resumed = Trainer::resume(gpu(), &dir, dataset(&c)).unwrap();
    let options = FitOptions {
        checkpoint_dir: Some(&dir),
        ..FitOptions::default()
    };
    let s = resumed.fit(&options, &mut []).unwrap();
    assert_eq!(s.early_stop, Some(expected.clone()));
    assert_eq!(s.steps, expected.step);
    assert_eq!(
        pointer(&dir, "best"),
        format!("step-{}", expected.best_step)
    );
}

#[test]
fn bad_early_stopping_settings_are_clear_errors() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["train.early_stopping_min_delta=-0.1"],
            "finite number ≥ 0",
        ),
        (&["train.early_stopping_min_delta=nan"], "finite number ≥ 0"),
        (
            &[
                "train.early_stopping_patience=0",
                "train.early_stopping_min_delta=0.01",
            ],
            "has no effect without train.early_stopping_patience",
        ),
        (
            &["train.eval_interval=300"],
            "needs evaluations during the run",
        ),
    ];
    for (extra, rule) in cases {
        let mut overrides: Vec<String> = vec![
            format!("train.max_steps={MAX_STEPS}"),
            format!("train.early_stopping_patience={PATIENCE}"),
        ];
        overrides.extend(extra.iter().map(|s| s.to_string()));
        let e = Config::from_toml("", &overrides).unwrap_err().to_string();
        assert!(
            e.contains("train.early_stopping") && e.contains(rule),
            "{extra:?}: {e}"
        );
    }
    // Off by default, and patience with evaluations inside the run is accepted.
    assert_eq!(Config::default().train.early_stopping_patience, 0);
    config(&["train.early_stopping_min_delta=0.01"]);
}

#[test]
fn a_run_without_early_stopping_has_no_best_pointer() {
    let (_, out) = run::train_tiny("no-best", 30);
    assert!(!out.join("best").exists());
    let e = checkpoint::resolve(&out.join("best"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.early_stopping_patience"), "{e}");
    let o = run::kiln()
        .args(["sample", "--max-tokens", "3", "--checkpoint"])
        .arg(out.join("best"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("early_stopping_patience"), "{stderr}");
}

/// `kiln train` says why and where it stopped; `kiln sample` and `kiln eval` read `RUN/best`.
#[test]
fn the_cli_reports_the_stop_and_reads_best() {
    let dir = run::tempdir("early-stop-cli");
    let data = dir.join("corpus.txt");
    std::fs::write(&data, overfitting_text()).unwrap();
    let out = dir.join("run");
    let mut args = run::tiny_args(&data, &out, MAX_STEPS as u32);
    for set in [
        "train.eval_interval=5",
        "train.checkpoint_interval=5",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "data.val_fraction=0.2",
        "train.early_stopping_patience=3",
    ] {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let o = run::kiln().args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("early stopping at step") && stderr.contains("the best,"),
        "{stderr}"
    );
    let best = pointer(&out, "best");
    assert!(stderr.contains(&format!("was at step {}", &best["step-".len()..])));
    for cmd in [
        vec!["eval", "--checkpoint"],
        vec!["sample", "--max-tokens", "3", "--checkpoint"],
    ] {
        for which in ["best", "latest"] {
            let o = run::kiln()
                .args(&cmd)
                .arg(out.join(which))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{cmd:?} {which}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}
