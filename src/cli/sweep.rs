//! `kiln sweep`: hyperparameter search (see kiln::sweep and docs/ARCHITECTURE.md).

use kiln::sweep::spec::SweepSpec;
use kiln::sweep::{self, SweepOptions, report};
use kiln::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// Sweep spec (TOML with [sweep] and [[sweep.param]]; see configs/sweep-baby.toml).
    #[arg(long)]
    config: PathBuf,
    /// UTF-8 text corpus (overrides the base config's data.path).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Sweep folder: journal.jsonl, results.txt, sweep.json, best.toml, sweep.png and one run
    /// folder per trial (trial-000, ...).
    #[arg(long)]
    out: PathBuf,
    /// Continue the sweep in --out from its journal: finished trials are kept, a trial that was
    /// running is run again from its start.
    #[arg(long)]
    resume: bool,
    /// No progress bars (a line per trial only).
    #[arg(long)]
    quiet: bool,
}

pub fn run(
    adapter: Option<String>,
    precision: Option<kiln::PrecisionChoice>,
    a: &SweepArgs,
) -> Result<()> {
    let mut spec = SweepSpec::load(&a.config)?;
    if precision.is_some() {
        // The flag wins over the base config's train.precision, as for kiln train.
        let p = kiln::PrecisionChoice::resolve(precision, spec.base.train.precision);
        spec.base.train.precision = p;
        spec.base_toml = toml::to_string(&spec.base).map_err(|e| Error::Config {
            message: e.to_string(),
        })?;
    }
    let data = a
        .data
        .clone()
        .or_else(|| (!spec.base.data.path.is_empty()).then(|| PathBuf::from(&spec.base.data.path)))
        .ok_or_else(|| {
            Error::invalid(
                "--data",
                "(none)",
                "give the corpus with --data FILE or data.path in the base config",
            )
        })?;
    if !data.is_file() {
        return Err(Error::invalid(
            "--data",
            data.display(),
            "is not a readable file; give the corpus the trials train on",
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // The first Ctrl-C ends the trial in flight with a checkpoint and stops the sweep (the trial
    // runs again on --resume); a second one quits at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: stopping after this step; continue with --resume (Ctrl-C again to quit now)"
        );
    });
    let opts = SweepOptions {
        spec,
        data,
        out_dir: a.out.clone(),
        resume: a.resume,
        adapter,
        progress: !a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let s = sweep::run(&opts, &stop)?;
    print!("{}", report::table(&opts.spec, &s.trials));
    let steps: u64 = s.trials.iter().map(|t| t.steps).sum();
    eprintln!("{} trials, {steps} steps in all", s.trials.len());
    match s.best {
        Some(b) => eprintln!(
            "best: trial {b}, {} {:.4}; its config: {}",
            opts.spec.objective,
            s.trials[b].value.unwrap_or(f64::NAN),
            a.out.join(report::BEST_FILE).display()
        ),
        None => eprintln!("no trial completed"),
    }
    eprintln!(
        "results: {} (table), {} (all trials), {} (plot)",
        a.out.join(report::RESULTS_FILE).display(),
        a.out.join(report::SUMMARY_FILE).display(),
        a.out.join(report::PLOT_FILE).display()
    );
    if s.interrupted {
        eprintln!("interrupted before the budget was spent: continue with --resume");
    }
    Ok(())
}
