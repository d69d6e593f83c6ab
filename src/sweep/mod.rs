//! Hyperparameter search: `kiln sweep`.
//!
//! A sweep reads a spec ([`spec`]), proposes each trial's parameters ([`sampler`]), trains it
//! in-process with [`crate::train::train`] (a [`crate::Trainer`] in a run folder) into `trial-NNN/` (an ordinary run folder),
//! stops trials the median pruner ([`pruner`]) judges hopeless, and records every event in an
//! append-only journal ([`journal`]) from which `--resume` rebuilds the sweep after a kill. At the
//! end (and after each trial) it writes the results ([`report`]): a table, `best.toml`,
//! `sweep.json` and `sweep.png`.

pub mod journal;
pub mod pruner;
pub mod report;
pub mod sampler;
pub mod spec;
pub mod tpe;

use crate::model::Config;
use crate::train::{Control, EvalSet, EvalStats, Observer, TrainOptions, train};
use crate::{Error, Result};
use journal::{Journal, TrialRecord, TrialState};
use spec::{Objective, SweepSpec};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The lock file that keeps a second `kiln sweep` out of a sweep folder.
const LOCK_FILE: &str = ".sweep-lock";

/// What to search and where.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    /// The parsed spec.
    pub spec: SweepSpec,
    /// The corpus.
    pub data: PathBuf,
    /// The sweep folder: journal, results and one run folder per trial.
    pub out_dir: PathBuf,
    /// Continue the sweep in `out_dir` from its journal.
    pub resume: bool,
    /// Adapter choice.
    pub adapter: Option<String>,
    /// Draw each trial's progress bar.
    pub progress: bool,
}

/// The trials of a sweep, by number, and the best.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SweepSummary {
    /// Every trial the journal knows, by number.
    pub trials: Vec<TrialRecord>,
    /// The number of the best COMPLETE trial.
    pub best: Option<usize>,
    /// Set when Ctrl-C ended the sweep before its budget was spent.
    pub interrupted: bool,
}

/// The name of a trial's run folder.
pub fn trial_dir(out: &Path, number: usize) -> PathBuf {
    out.join(format!("trial-{number:03}"))
}

/// The `key=value` overrides that turn the base config into a trial's.
pub fn overrides(t: &TrialRecord) -> Vec<String> {
    t.params
        .iter()
        .map(|(k, v)| {
            let v: toml::Value = serde_json::from_value(v.clone())
                .unwrap_or_else(|_| toml::Value::String(v.to_string()));
            format!("{k}={v}")
        })
        .collect()
}

/// A trial's full config.
pub fn trial_config(spec: &SweepSpec, t: &TrialRecord) -> Result<Config> {
    Config::from_toml(&spec.base_toml, &overrides(t))
}

/// The best COMPLETE trial (lowest objective; the lower number on a tie).
pub fn best_trial(trials: &[TrialRecord]) -> Option<usize> {
    trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .filter_map(|t| t.value.map(|v| (t.number, v)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(n, _)| n)
}

/// Takes the sweep folder's lock for this process (released by the OS however it ends).
fn lock(out: &Path) -> Result<fs::File> {
    let err = |m: String| Error::RunFolder {
        path: out.display().to_string(),
        message: m,
    };
    fs::create_dir_all(out).map_err(|e| {
        err(format!(
            "cannot be created ({e}); choose another --out or fix its permissions"
        ))
    })?;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(out.join(LOCK_FILE))
        .map_err(|e| err(format!("cannot be written ({e}); choose another --out")))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(err(
            "another kiln sweep is running in it; wait for it to end, or use another --out".into(),
        )),
        Err(fs::TryLockError::Error(e)) => Err(err(format!("cannot be locked: {e}"))),
    }
}

/// Errors that would fail every trial alike (the corpus, the folder, the adapter): they end the
/// sweep, leaving the trial RUNNING for `--resume`, instead of burning the budget on FAILs.
fn ends_the_sweep(e: &Error) -> bool {
    matches!(
        e,
        Error::Data { .. }
            | Error::Io { .. }
            | Error::RunFolder { .. }
            | Error::NoAdapter { .. }
            | Error::AdapterNotFound { .. }
            | Error::RequestDevice { .. }
    )
}

/// Runs (or, with `resume`, continues) a sweep. `stop` (Ctrl-C) ends the trial in flight with a
/// checkpoint and the sweep after it; that trial stays RUNNING and a resume runs it again.
pub fn run(opts: &SweepOptions, stop: &AtomicBool) -> Result<SweepSummary> {
    let spec = &opts.spec;
    let out = &opts.out_dir;
    let _lock = lock(out)?;
    let journal_path = out.join(journal::JOURNAL_FILE);
    let (journal, mut trials) = if opts.resume {
        if !journal_path.is_file() {
            return Err(Error::RunFolder {
                path: out.display().to_string(),
                message: "holds no sweep to resume (no journal.jsonl); start one without --resume"
                    .into(),
            });
        }
        let (j, identity, trials) = Journal::resume(out)?;
        if identity != spec.identity() {
            return Err(Error::invalid(
                "--resume",
                out.display(),
                "the sweep in this folder was started with another spec (method, seed, \
                 objective, pruner, parameters or base config differ; only sweep.trials may \
                 change); resume with the same spec, or start the new one in another --out",
            ));
        }
        (j, trials)
    } else {
        if journal_path.exists() {
            return Err(Error::RunFolder {
                path: out.display().to_string(),
                message: "already holds a sweep (journal.jsonl); continue it with --resume, or \
                          choose another --out"
                    .into(),
            });
        }
        (Journal::create(out, spec.identity())?, Vec::new())
    };
    let journal = Arc::new(Mutex::new(journal));
    let done = trials.iter().filter(|t| t.is_finished()).count();
    if opts.resume {
        eprintln!(
            "resuming: {done} finished trial(s) kept, {} to run again",
            trials.len() - done
        );
    }
    let mut interrupted = false;
    for number in 0..spec.trials {
        if trials.get(number).is_some_and(|t| t.is_finished()) {
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        // A trial that was RUNNING when the sweep died runs again, from the start, with the
        // parameters it was created with.
        let params = match trials.get(number) {
            Some(t) => t.params.clone(),
            None => {
                let point = sampler::suggest(spec, number, &trials);
                spec.params
                    .iter()
                    .zip(&point)
                    .map(|(p, v)| (p.key.clone(), sampler::to_json(v)))
                    .collect()
            }
        };
        let record = TrialRecord::running(number, params);
        lock_journal(&journal).created(number, &record.params)?;
        if number < trials.len() {
            trials[number] = record;
        } else {
            trials.push(record);
        }
        let finished = run_trial(opts, &journal, &trials, number, stop)?;
        match finished {
            Some(t) => {
                lock_journal(&journal).finished(&t)?;
                progress_line(spec, &trials, &t);
                trials[number] = t;
            }
            None => {
                interrupted = true;
                break;
            }
        }
        let summary = summarize(&trials, interrupted);
        if let Err(e) = report::write_files(spec, out, &summary) {
            log::warn!("could not write the sweep's results: {e}");
        }
    }
    let summary = summarize(&trials, interrupted);
    report::write_files(spec, out, &summary)?;
    Ok(summary)
}

fn summarize(trials: &[TrialRecord], interrupted: bool) -> SweepSummary {
    SweepSummary {
        trials: trials.to_vec(),
        best: best_trial(trials),
        interrupted,
    }
}

fn lock_journal(j: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    j.lock().unwrap_or_else(|e| e.into_inner())
}

/// Trains trial `number` (its record is `trials[number]`); returns its finished record, or
/// `None` when Ctrl-C stopped it.
fn run_trial(
    opts: &SweepOptions,
    journal: &Arc<Mutex<Journal>>,
    trials: &[TrialRecord],
    number: usize,
    stop: &AtomicBool,
) -> Result<Option<TrialRecord>> {
    let spec = &opts.spec;
    let mut t = trials[number].clone();
    // Parameters that are each valid can still clash (n_head not dividing n_embd): a FAIL.
    let config = match trial_config(spec, &t) {
        Ok(c) => c,
        Err(e) => {
            t.state = TrialState::Fail;
            t.error = Some(e.to_string());
            return Ok(Some(t));
        }
    };
    let completed: Vec<Vec<(u64, f64)>> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .map(|t| t.reports.clone())
        .collect();
    let mut observer = TrialObserver {
        journal: journal.clone(),
        number,
        pruner: spec.pruner,
        max_steps: config.train.max_steps as u64,
        completed,
        reports: Vec::new(),
        pruned: false,
        write_error: None,
    };
    let train_opts = TrainOptions {
        config,
        data: opts.data.clone(),
        out_dir: trial_dir(&opts.out_dir, number),
        resume: false,
        resume_from: None,
        // The folder may hold the start of an attempt killed with the sweep: start it over.
        overwrite: true,
        progress: opts.progress,
        adapter: opts.adapter.clone(),
        stop_after: None,
        init_from: None,
    };
    let start = Instant::now();
    let result = train(&train_opts, stop, &mut [&mut observer]);
    t.seconds = start.elapsed().as_secs_f64();
    if let Some(e) = observer.write_error {
        return Err(e);
    }
    t.reports = observer.reports;
    match result {
        Ok(summary) => {
            t.steps = summary.steps;
            if observer.pruned {
                t.state = TrialState::Pruned;
                t.value = t.best_reported();
            } else if stop.load(Ordering::Relaxed) {
                return Ok(None);
            } else {
                t.state = TrialState::Complete;
                t.value = match spec.objective {
                    Objective::ValLoss => summary.val_loss,
                    Objective::BestValLoss => t.best_reported(),
                };
            }
        }
        Err(e) if ends_the_sweep(&e) => return Err(e),
        Err(e) => {
            t.state = TrialState::Fail;
            t.steps = t.reports.last().map_or(0, |r| r.0);
            t.error = Some(e.to_string());
        }
    }
    Ok(Some(t))
}

/// Records a trial's periodic validation losses in the journal and prunes the trial when the
/// median rule says it is hopeless.
struct TrialObserver {
    journal: Arc<Mutex<Journal>>,
    number: usize,
    pruner: Option<spec::PrunerSpec>,
    max_steps: u64,
    /// The reports of the trials completed before this one.
    completed: Vec<Vec<(u64, f64)>>,
    reports: Vec<(u64, f64)>,
    pruned: bool,
    /// A journal write that failed: the trial stops (with its checkpoint) and the error ends
    /// the sweep after it, whatever kind of error it is.
    write_error: Option<Error>,
}

impl Observer for TrialObserver {
    fn on_eval(&mut self, e: &EvalStats) -> Result<Control> {
        // The objective is measured on the periodic batches; the final full-split score is
        // the run's own record.
        if e.set != EvalSet::Periodic {
            return Ok(Control::Continue);
        }
        self.reports.push((e.step, e.loss));
        if let Err(err) = lock_journal(&self.journal).report(self.number, e.step, e.loss) {
            self.write_error = Some(err);
            return Ok(Control::Stop);
        }
        let views: Vec<&[(u64, f64)]> = self.completed.iter().map(|c| c.as_slice()).collect();
        // The last evaluation is the result: stopping there would save nothing.
        let last = e.step >= self.max_steps;
        if !last
            && self
                .pruner
                .is_some_and(|p| pruner::should_prune(&p, &self.reports, &views))
        {
            self.pruned = true;
            return Ok(Control::Stop);
        }
        Ok(Control::Continue)
    }
}

/// The one line per finished trial on stderr.
fn progress_line(spec: &SweepSpec, trials: &[TrialRecord], t: &TrialRecord) {
    let value = t.value.map_or("-".into(), |v| format!("{v:.4}"));
    let mut all = trials.to_vec();
    all[t.number] = t.clone();
    let best = best_trial(&all)
        .and_then(|b| all[b].value.map(|v| format!(" (best {v:.4}, trial {b})")))
        .unwrap_or_default();
    let params: Vec<String> = overrides(t);
    eprintln!(
        "trial {}/{}: {} {value}{best}, {} steps, {:.0} s; {}{}",
        t.number + 1,
        spec.trials,
        t.state,
        t.steps,
        t.seconds,
        params.join(" "),
        t.error
            .as_ref()
            .map(|e| format!("\n  error: {e}"))
            .unwrap_or_default()
    );
}
