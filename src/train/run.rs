//! A training run into a run folder, as `kiln train` and each `kiln sweep` trial do it: the
//! folder's lock and rules ([`RunDir`]), the corpus from a path, the resume checks, then a
//! [`Trainer`] fitted with the metrics log, the loss plot and the progress display attached.

use super::checkpoint;
use super::fit::FitOptions;
use super::observer::Observer;
use super::observers::{LossPlot, MetricsLog, Progress};
use super::run_dir::{METRICS_FILE, RunDir, RunMode};
use super::stats::TrainSummary;
use super::trainer::Trainer;
use crate::data::Dataset;
use crate::dist::{Communicator, Single};
use crate::gpu::{Gpu, GpuOptions};
use crate::model::Config;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// What to train and where.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The run's configuration (validated).
    pub config: Config,
    /// The corpus.
    pub data: PathBuf,
    /// Folder for checkpoints, metrics and the copy of the config.
    pub out_dir: PathBuf,
    /// Continue from the latest checkpoint in `out_dir`.
    pub resume: bool,
    /// With `resume`: continue from the checkpoint of this step instead of the latest.
    pub resume_from: Option<u64>,
    /// Without `resume`: replace a run already in `out_dir` (otherwise that is an error).
    pub overwrite: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Adapter choice.
    pub adapter: Option<String>,
    /// Stop (with a checkpoint) after this many steps of this invocation, whatever max_steps says.
    pub stop_after: Option<u64>,
    /// Start a new run from this checkpoint's weights (a run folder, `RUN/latest`, `RUN/best`
    /// or a step folder): fine-tuning. Not with `resume`.
    pub init_from: Option<PathBuf>,
}

/// Trains as `opts` say into the run folder `opts.out_dir`, reporting to the folder's
/// `metrics.jsonl` and `loss.png`, the progress display, then `observers` (a sweep's pruner).
/// `stop` (set by Ctrl-C) ends the run after the step in flight, with a checkpoint.
///
/// Everything that can be checked cheaply is checked before the corpus is read and the GPU
/// opened: the options, the folder (see [`RunDir::open`]), the checkpoint to resume and its
/// tokenizer against the corpus.
pub fn train(
    opts: &TrainOptions,
    stop: &AtomicBool,
    observers: &mut [&mut dyn Observer],
) -> Result<TrainSummary> {
    train_in(opts, Box::new(Single), stop, observers)
}

/// [`train`] as one rank of a data-parallel run over `comm` (`mpirun -np N kiln train`): every
/// rank reads the corpus and the checkpoint to resume, opens its own device (by local rank,
/// unless `opts.adapter` or `KILN_ADAPTER` chooses) and trains on its share of each global
/// batch; rank 0 alone touches the run folder (lock, config, metrics, plot, checkpoints) and
/// reports to `observers`.
pub fn train_in(
    opts: &TrainOptions,
    comm: Box<dyn Communicator>,
    stop: &AtomicBool,
    observers: &mut [&mut dyn Observer],
) -> Result<TrainSummary> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let writer = rank == 0;
    // The corpus is recorded in the saved config, so `kiln eval` can find the validation split.
    let mut config = opts.config.clone();
    if config.data.path.is_empty() {
        config.data.path = std::fs::canonicalize(&opts.data)
            .unwrap_or_else(|_| opts.data.clone())
            .display()
            .to_string();
    }
    // The checkpoint to start from is read (and refused) before anything is written.
    let base = match &opts.init_from {
        Some(_) if opts.resume => {
            return Err(Error::invalid(
                "--init-from",
                "with --resume",
                "--init-from starts a new run; --resume continues one (a fine-tuning run \
                 resumes like any other, without --init-from)",
            ));
        }
        Some(path) => {
            let dir = checkpoint::resolve(path)?;
            // The source is never written: not by this run, not by its --overwrite.
            if let (Ok(src), Ok(out)) = (
                std::fs::canonicalize(&dir),
                std::fs::canonicalize(&opts.out_dir),
            ) && src.starts_with(&out)
            {
                return Err(Error::invalid(
                    "--out",
                    opts.out_dir.display(),
                    "holds the --init-from checkpoint; a fine-tuning run writes a new folder \
                     and never the run it starts from (give another --out)",
                ));
            }
            let ck = checkpoint::load(&dir)?;
            super::trainer::check_base(&ck, &config)?;
            let shown = std::fs::canonicalize(&dir).unwrap_or(dir);
            config.finetune.init_from = Some(shown.display().to_string());
            Some(ck)
        }
        None => None,
    };
    config.validate()?;
    let mode = run_mode(opts)?;
    crate::dist::rank_rows(config.train.batch_size, ranks, rank)?;
    let block = config.model.block_size;
    // A new run reads its corpus before the folder is touched, so that a corpus refused (empty,
    // not UTF-8, characters the base checkpoint's tokenizer lacks) leaves an existing run in
    // that folder untouched, --overwrite or not.
    let fresh_dataset = if opts.resume {
        None
    } else {
        let tokenizer_json = base.as_ref().map(|b| &b.tokenizer_json);
        Some(load_dataset(opts, &config.data, tokenizer_json, block)?)
    };
    // The other ranks only read the folder (the checkpoint to resume); rank 0 holds its lock.
    let run = if writer {
        Some(RunDir::open(&opts.out_dir, mode)?)
    } else {
        None
    };
    let (checkpoint, dataset) = match fresh_dataset {
        Some(dataset) => {
            if let Some(run) = &run {
                run.write_config(&config)?;
                let _ = std::fs::remove_file(opts.out_dir.join(METRICS_FILE));
            }
            (None, dataset)
        }
        None => {
            let dir = match opts.resume_from {
                Some(step) => checkpoint::step_dir(&opts.out_dir, step)?,
                None => checkpoint::latest_dir(&opts.out_dir)?,
            };
            let ck = checkpoint::load(&dir)?;
            // A resumed run tokenises with the checkpoint's data settings; a resumed
            // fine-tuning run with the tokenizer of the checkpoint it started from (its own,
            // which is the same).
            let tokenizer_json = ck
                .config
                .finetune
                .init_from
                .is_some()
                .then_some(&ck.tokenizer_json);
            let dataset = load_dataset(opts, &ck.config.data, tokenizer_json, block)?;
            (Some(ck), dataset)
        }
    };
    if let Some(ck) = &checkpoint {
        check_tokenizer(ck, &dataset, opts)?;
    }
    let adapter = match &opts.adapter {
        Some(a) => Some(a.clone()),
        None if ranks > 1 && std::env::var_os("KILN_ADAPTER").is_none() => {
            crate::gpu::adapter_for_local_rank(comm.local_rank())
        }
        None => None,
    };
    let gpu = Gpu::with_options(&GpuOptions {
        adapter,
        precision: config.train.precision,
    })?;
    let mut trainer = match checkpoint {
        Some(ck) => {
            let trainer = Trainer::from_checkpoint_in(gpu, config, dataset, ck, comm)?;
            if let Some(run) = &run {
                run.truncate_metrics(trainer.steps_done())?;
            }
            trainer
        }
        None => match &base {
            Some(b) => Trainer::from_pretrained_in(gpu, config, dataset, b, comm)?,
            None => Trainer::new_in(gpu, config, dataset, comm)?,
        },
    };
    let c = &trainer.config().model;
    let title = format!(
        "{} layers x {} wide, {} heads, context {} ({})",
        c.n_layer,
        c.n_embd,
        c.n_head,
        c.block_size,
        trainer.precision()
    );
    let max_steps = trainer.config().train.max_steps as u64;
    let mut metrics = MetricsLog::new(&opts.out_dir);
    let mut plot = LossPlot::new(&opts.out_dir, title);
    let mut progress = Progress::new(opts.progress && writer, max_steps, trainer.steps_done());
    let mut all: Vec<&mut dyn Observer> = Vec::new();
    if writer {
        all.push(&mut metrics);
        all.push(&mut plot);
        all.push(&mut progress);
        for o in observers.iter_mut() {
            all.push(&mut **o);
        }
    }
    let options = FitOptions {
        checkpoint_dir: Some(&opts.out_dir),
        stop_after: opts.stop_after,
        stop: Some(stop),
    };
    trainer
        .fit(&options, &mut all)
        .map_err(|e| with_resume_advice(e, &opts.out_dir))
}

/// The option checks, and what the run does with its folder.
fn run_mode(opts: &TrainOptions) -> Result<RunMode> {
    if opts.resume_from.is_some() && !opts.resume {
        return Err(Error::invalid(
            "--resume-from",
            opts.resume_from.unwrap_or_default(),
            "continues a run: give it with --resume (or use --resume-from alone on the command line)",
        ));
    }
    if opts.resume && opts.overwrite {
        return Err(Error::invalid(
            "--overwrite",
            "with --resume",
            "--overwrite replaces a run and --resume continues it; choose one",
        ));
    }
    Ok(if opts.resume {
        RunMode::Resume {
            from: opts.resume_from,
        }
    } else {
        RunMode::Fresh {
            overwrite: opts.overwrite,
        }
    })
}

/// The corpus, tokenised with a checkpoint's tokenizer when one is given (fine-tuning), else
/// as `data` says.
fn load_dataset(
    opts: &TrainOptions,
    data: &crate::model::DataConfig,
    tokenizer_json: Option<&String>,
    block: usize,
) -> Result<Dataset> {
    match tokenizer_json {
        Some(json) => crate::finetune::corpus::dataset(
            &opts.data,
            crate::data::Tokenizer::from_json(json)?,
            data.val_fraction,
            block,
        ),
        None => Dataset::load(&opts.data, data, block),
    }
}

/// A resume must see the ids the model was trained on: checked before the GPU is opened.
fn check_tokenizer(
    ck: &checkpoint::Checkpoint,
    dataset: &Dataset,
    opts: &TrainOptions,
) -> Result<()> {
    if ck.tokenizer_json == dataset.tokenizer().to_json()? {
        return Ok(());
    }
    let theirs = crate::data::Tokenizer::from_json(&ck.tokenizer_json)?.vocab_size();
    Err(Error::invalid(
        "--resume",
        opts.out_dir.display(),
        format!(
            "the checkpoint's tokenizer ({theirs} tokens) differs from the one built from {} \
             ({} tokens); resume with the corpus the run was trained on",
            opts.data.display(),
            dataset.tokenizer().vocab_size()
        ),
    ))
}

/// A diverged run's error, completed with what to do in terms of this run folder: the trainer
/// never checkpoints a non-finite state, so `latest` still names the last good checkpoint.
fn with_resume_advice(e: Error, out: &Path) -> Error {
    let Error::NonFinite { what, message } = e else {
        return e;
    };
    let last_good = checkpoint::latest_dir(out)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let resume = match &last_good {
        Some(name) => format!(
            "`latest` still names {name}, the last good checkpoint: resume from it or an \
             earlier one (kiln train --out {} --resume-from N) with a lower train.lr",
            out.display()
        ),
        None => "there is no earlier checkpoint: start again with a lower train.lr".to_string(),
    };
    Error::NonFinite {
        what,
        message: format!("{message}. No checkpoint was written from this state; {resume}"),
    }
}
