//! `kiln train` and `kiln eval`.

use kiln::model::Config;
use kiln::train::TrainOptions;
use kiln::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML config file (see configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UTF-8 text corpus (overrides data.path).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder for checkpoints, metrics.jsonl, loss.png and config.toml.
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Continue from the latest checkpoint in --out (its config.toml is used unless --config).
    #[arg(long)]
    resume: bool,
    /// Continue from the checkpoint of this step (a step-N folder in --out) instead of the
    /// latest; implies --resume. Later checkpoints stay until this run's own saves replace them.
    #[arg(long, value_name = "STEP")]
    resume_from: Option<u64>,
    /// Replace the run already in --out (its checkpoints, metrics, plot and config) instead of
    /// refusing to start.
    #[arg(long, conflicts_with_all = ["resume", "resume_from"])]
    overwrite: bool,
    /// Override a config value, e.g. --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Stop after this many steps of this invocation (with a checkpoint).
    #[arg(long)]
    steps: Option<u64>,
    /// Fine-tune: start a new run in --out from this checkpoint's weights (a run folder,
    /// RUN/latest, RUN/best or RUN/step-N) with fresh optimizer state, the checkpoint's
    /// tokenizer and the schedule of --config (default: the checkpoint's own config).
    #[arg(long, value_name = "CKPT", conflicts_with_all = ["resume", "resume_from"])]
    init_from: Option<PathBuf>,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
}

pub fn run(
    adapter: Option<String>,
    precision: Option<kiln::PrecisionChoice>,
    a: &TrainArgs,
) -> Result<()> {
    if a.steps == Some(0) {
        return Err(Error::invalid(
            "--steps",
            0,
            "must be at least 1 (leave it out to train to train.max_steps)",
        ));
    }
    let out = a.out.clone();
    let resume = a.resume || a.resume_from.is_some();
    let mut config = match (&a.config, resume) {
        (Some(path), _) => Config::load(path, &a.overrides)?,
        (None, true) => {
            let path = out.join("config.toml");
            if !path.is_file() {
                return Err(Error::RunFolder {
                    path: out.display().to_string(),
                    message: "holds no run to resume (no config.toml); start one without \
                              --resume, or check --out"
                        .into(),
                });
            }
            Config::load(&path, &a.overrides)?
        }
        (None, false) => match &a.init_from {
            // A fine-tuning run without a config continues with the checkpoint's settings (its
            // model, and its schedule unless overridden), on the new corpus.
            Some(ck) => {
                let dir = kiln::train::checkpoint::resolve(ck)?;
                let mut c = Config::load(&dir.join("config.toml"), &a.overrides)?;
                c.data.path.clear();
                c.finetune.init_from = None;
                c
            }
            None => Config::from_toml("", &a.overrides)?,
        },
    };
    config.train.precision = kiln::PrecisionChoice::resolve(precision, config.train.precision);
    let data = a
        .data
        .clone()
        .or_else(|| (!config.data.path.is_empty()).then(|| PathBuf::from(&config.data.path)))
        .ok_or_else(|| {
            Error::invalid(
                "--data",
                "(none)",
                "give the corpus with --data FILE or data.path in the config",
            )
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // The first Ctrl-C finishes the step in flight, evaluates and checkpoints; a second one quits.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    });
    let opts = TrainOptions {
        config,
        data,
        out_dir: out.clone(),
        resume,
        resume_from: a.resume_from,
        overwrite: a.overwrite,
        progress: !a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        adapter,
        stop_after: a.steps,
        init_from: a.init_from.clone(),
    };
    let s = kiln::train::train_in(&opts, communicator()?, &stop, &mut [])?;
    eprintln!(
        "done: {} steps, val loss {}, {:.1} ms/step, {:.0} tokens/s, {:.2} model GFLOP/s, {} dispatches/step, {:.0} µs to encode a step ({:.0} µs until its submit returned), {} skipped steps, precision {}",
        s.steps,
        s.val_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "-".into()),
        s.ms_per_step,
        s.tokens_per_s,
        s.model_gflops,
        s.dispatches_per_step,
        s.encode_us,
        s.submit_us,
        s.skipped_steps,
        s.precision
    );
    if let Some(v) = s.full_val_loss {
        eprintln!(
            "validation loss over the whole validation split: {v:.4} (perplexity {:.2}, {} tokens)",
            v.exp(),
            s.full_val_tokens
        );
    }
    if let Some(e) = &s.early_stop {
        eprintln!(
            "{e}; that checkpoint is {} (kiln sample --checkpoint {0})",
            out.join(kiln::train::checkpoint::BEST_FILE).display()
        );
    }
    if s.ranks > 1 {
        eprintln!(
            "{} ranks: {:.1} ms/step exchanging gradients (after {:.1} ms/step waiting for the \
             slowest rank), {:.1} ms/step reading them back (with the wait for the backward) \
             and writing the average; final weights sha256 {}",
            s.ranks,
            s.comm_ms_per_step,
            s.wait_ms_per_step,
            s.readback_ms_per_step,
            s.weights_sha256.as_deref().unwrap_or("-")
        );
    }
    if let Some(ck) = &s.checkpoint {
        eprintln!("checkpoint: {}", ck.display());
    }
    eprintln!("metrics: {}", out.join("metrics.jsonl").display());
    eprintln!("loss curve: {}", out.join("loss.png").display());
    println!("{}", serde_json::to_string(&s).unwrap_or_default());
    Ok(())
}

/// The ranks of this run: MPI's world when an MPI launcher started this process (and kiln was
/// built with the `mpi` feature), otherwise this process alone.
fn communicator() -> Result<Box<dyn kiln::dist::Communicator>> {
    let launched = kiln::dist::launcher_world_size();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        let timeout = kiln::dist::timeout_from_env()?;
        let comm = kiln::dist::mpi::MpiComm::init(timeout)?;
        use kiln::dist::Communicator as _;
        if comm.rank() == 0 && comm.size() > 1 {
            eprintln!(
                "data-parallel training: {} ranks, exchange deadline {:.0} s ({})",
                comm.size(),
                timeout.as_secs_f64(),
                kiln::dist::TIMEOUT_ENV
            );
        }
        return Ok(Box::new(comm));
    }
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = launched.filter(|&n| n > 1) {
        return Err(Error::Distributed {
            message: format!(
                "this process was started as one of {n} MPI ranks, but this kiln was built \
                 without MPI: every rank would train alone into the same folder. Build with \
                 `cargo build --release --features mpi` (needs OpenMPI: apt-get install \
                 openmpi-bin libopenmpi-dev libclang-dev clang), or run kiln without mpirun"
            ),
        });
    }
    let _ = launched;
    Ok(Box::new(kiln::dist::Single))
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A run folder (its latest checkpoint), one of its pointers (RUN/latest, RUN/best: the
    /// lowest validation loss of an early-stopping run) or a checkpoint folder (RUN/step-N).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Score this text file instead of the training corpus's validation split.
    #[arg(long)]
    data: Option<PathBuf>,
    /// At most this many validation batches (default: the config's eval_batches).
    #[arg(long, default_value_t = usize::MAX)]
    batches: usize,
    /// Score every token of the validation split once, in consecutive windows, instead of the
    /// fixed validation batches.
    #[arg(long, conflicts_with_all = ["data", "batches"])]
    full_split: bool,
    /// Apply this LoRA adapter (a PEFT folder, e.g. a kiln LoRA run or its RUN/latest) to the
    /// checkpoint's weights.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Also evaluate this checkpoint (e.g. the float one a quantised model was made from) on
    /// the same tokens, and print the two perplexities side by side.
    #[arg(long)]
    compare: Option<PathBuf>,
}

pub fn eval(
    adapter: Option<String>,
    precision: Option<kiln::PrecisionChoice>,
    a: &EvalArgs,
) -> Result<()> {
    let precision = checkpoint_precision(&a.checkpoint, precision);
    super::eval::run(
        &a.checkpoint,
        a.lora.as_deref().map(adapter_dir).as_deref(),
        a.compare.as_deref(),
        a.data.as_deref(),
        a.batches,
        a.full_split,
        &kiln::GpuOptions { adapter, precision },
    )
}

/// The adapter folder `--lora` means: a run folder or a pointer resolves to its checkpoint
/// (which a LoRA run writes as a PEFT folder too); any other folder is taken as it is.
pub fn adapter_dir(path: &std::path::Path) -> PathBuf {
    if path
        .join(kiln::finetune::peft::ADAPTER_CONFIG_FILE)
        .is_file()
    {
        return path.to_path_buf();
    }
    kiln::train::checkpoint::resolve(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The storage precision for a command that loads a checkpoint: the flag, else the checkpoint
/// config's `train.precision` (see [`kiln::PrecisionChoice::resolve`]). A checkpoint that cannot
/// be read here is left for the loader to report.
pub fn checkpoint_precision(
    path: &std::path::Path,
    flag: Option<kiln::PrecisionChoice>,
) -> kiln::PrecisionChoice {
    let config = kiln::train::checkpoint::resolve(path)
        .and_then(|dir| kiln::train::checkpoint::read_config(&dir))
        .map(|c| c.train.precision)
        .unwrap_or_default();
    kiln::PrecisionChoice::resolve(flag, config)
}
