//! Command-line parsing and the subcommands.

mod bench;
mod eval;
mod info;
mod interop;
mod lora;
mod params;
mod profile;
mod quantize;
mod sample;
mod sweep;
mod train;

use clap::{Parser, Subcommand};
use kiln::{Gpu, GpuOptions, PrecisionChoice, Result};

/// Train and sample small language models on any GPU through WGSL compute shaders.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about)]
pub struct Args {
    /// Adapter to use: an index from `kiln info` or part of its name (default: best hardware adapter).
    #[arg(long, global = true, env = "KILN_ADAPTER")]
    adapter: Option<String>,
    /// Storage precision: auto (f16 on GPUs granting SHADER_F16, f32 on CPU-backed adapters),
    /// f16 or f32. Overrides the config's train.precision (train: the run's config; eval,
    /// sample: the checkpoint's); without it that setting applies, and auto where there is none.
    #[arg(long, global = true)]
    precision: Option<PrecisionChoice>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every adapter, the one kiln picks, and the features and limits granted.
    Info(info::InfoArgs),
    /// Train a GPT on a text corpus (progress, evaluation, checkpoints, resume).
    Train(train::TrainArgs),
    /// Loss and perplexity of a checkpoint on its validation split or a text file.
    Eval(train::EvalArgs),
    /// Hyperparameter search: grid, random or TPE trials with median pruning; resumable.
    Sweep(sweep::SweepArgs),
    /// Generate text from a checkpoint.
    Sample(sample::SampleArgs),
    /// Parameter counts of a config: per component, weights vs biases, and training-state bytes.
    Params(params::ParamsArgs),
    /// LoRA adapters: merge one into its base checkpoint.
    #[command(subcommand)]
    Lora(lora::LoraCommand),
    /// Quantise a checkpoint's weights to 8 or 4 bits for sample and eval.
    Quantize(quantize::QuantizeArgs),
    /// Where one training step's time goes: every op timed, by kind, with dispatches and rates.
    Profile(profile::ProfileArgs),
    /// Export a checkpoint as a Hugging Face folder (transformers) or a GGUF file (llama.cpp).
    Export(interop::ExportArgs),
    /// Import a Hugging Face GPT-2 or Llama folder as a kiln run folder.
    Import(interop::ImportArgs),
    /// Logits of every position of a text (and a greedy continuation) as JSON, in f32 unless
    /// --precision says otherwise: for comparing kiln with an export.
    Logits(interop::LogitsArgs),
    /// Time kernels on the GPU against the CPU reference.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

impl Args {
    fn open_gpu(&self) -> Result<Gpu> {
        Gpu::with_options(&GpuOptions {
            adapter: self.adapter.clone(),
            precision: self.precision.unwrap_or_default(),
        })
    }
}

/// Runs the parsed command.
pub fn run(args: Args) -> Result<()> {
    match &args.command {
        Command::Info(a) => info::run(&args, a),
        Command::Bench(b) => bench::run(&args, b),
        Command::Profile(p) => profile::run(&args, p),
        Command::Params(p) => params::run(p),
        Command::Quantize(q) => quantize::run(q),
        Command::Lora(l) => lora::run(l),
        Command::Export(e) => interop::export(e),
        Command::Import(i) => interop::import(i),
        Command::Logits(l) => interop::logits(args.adapter.clone(), args.precision, l),
        Command::Train(t) => train::run(args.adapter.clone(), args.precision, t),
        Command::Eval(e) => train::eval(args.adapter.clone(), args.precision, e),
        Command::Sweep(s) => sweep::run(args.adapter.clone(), args.precision, s),
        Command::Sample(s) => sample::run(args.adapter.clone(), args.precision, s),
    }
}
