//! `kiln profile`: where one training step's time goes.

use super::Args;
use kiln::model::Config;
use kiln::model::profile::{OpTiming, StepProfile, profile_step};
use kiln::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    /// TOML config file (see configs/); without it, the built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value, e.g. --set model.n_layer=6 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Vocabulary size of the model (65 is character-level Shakespeare).
    #[arg(long, default_value_t = 65)]
    vocab: usize,
    /// Profiled steps (after one warm-up); each op's time is the median over them.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Time each op submitted alone instead of with timestamps inside the step (the default on
    /// CPU-backed adapters, whose timestamps do not bracket the work; see --timestamps).
    #[arg(long, conflicts_with = "timestamps")]
    alone: bool,
    /// Use GPU timestamps inside the step even on a CPU-backed adapter.
    #[arg(long)]
    timestamps: bool,
    /// Print the whole profile as JSON (every op, in order) instead of the table.
    #[arg(long)]
    json: bool,
    /// Also draw the table as a bar chart into this PNG.
    #[arg(long)]
    chart: Option<PathBuf>,
}

/// The config at `path` (or the defaults) with `overrides` applied.
pub(super) fn load_config(path: Option<&Path>, overrides: &[String]) -> Result<Config> {
    match path {
        Some(path) => Config::load(path, overrides),
        None => Config::from_toml("", overrides),
    }
}

pub fn run(args: &Args, a: &ProfileArgs) -> Result<()> {
    let config = load_config(a.config.as_deref(), &a.overrides)?;
    let gpu = args.open_gpu()?;
    // lavapipe writes a timestamp when its queue thread reaches the command, not when the
    // dispatches before it have finished: in a profile of the baby GPT the timestamps gave AdamW
    // 0.16 ms (98 GB/s, several times what two cores can stream) and summed to 420 ms of a
    // 612 ms step, while the same AdamW submitted alone took 25-80 ms. So on CPU-backed adapters
    // each op is timed alone unless --timestamps asks otherwise.
    let software = gpu.capabilities().adapter.software;
    let timing = if a.alone || (software && !a.timestamps) {
        OpTiming::Submissions
    } else {
        OpTiming::Timestamps
    };
    if software && !a.alone && !a.timestamps && !a.json {
        println!(
            "(a CPU-backed adapter: its GPU timestamps do not bracket the work, so each op is \
             timed alone; --timestamps to use them anyway)"
        );
    }
    let p = profile_step(&gpu, &config, a.vocab, a.steps, timing)?;
    if let Some(chart) = &a.chart {
        kiln::train::plot::plot_profile(chart, &p)?;
    }
    if a.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "profile": p,
            "by_kind": p.by_kind(),
            "model_gflops": p.model_gflops(),
        }))
        .map_err(|e| Error::invalid("--json", "", e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    println!("step of a {}, {} on {}", p.model, p.precision, p.adapter);
    println!(
        "whole step: {:.2} ms ({:.0} tokens/s, {:.2} model GFLOP/s); {} dispatches; host \
         encode {:.2} ms",
        p.step_s * 1e3,
        p.tokens as f64 / p.step_s,
        p.model_gflops(),
        p.dispatches,
        p.encode_s * 1e3
    );
    println!(
        "ops timed {}: {:.2} ms in all",
        match p.timing {
            OpTiming::Timestamps => "by GPU timestamps inside one submission of the step",
            OpTiming::Submissions => "each submitted alone (wall clock, submit to completion)",
        },
        p.ops_s() * 1e3
    );
    print_kinds(&p);
    if let Some(chart) = &a.chart {
        println!("chart: {}", chart.display());
    }
    Ok(())
}

/// The table by op kind: count, dispatches, ms, share, and GFLOP/s or GB/s.
pub(super) fn print_kinds(p: &StepProfile) {
    println!(
        "{:<32} {:>5} {:>6} {:>10} {:>7} {:>14}",
        "op", "count", "disp.", "total ms", "share", "rate"
    );
    for r in p.by_kind() {
        let rate = match r.gflops {
            Some(g) => format!("{g:.2} GFLOP/s"),
            None => format!("{:.2} GB/s", r.gbps),
        };
        println!(
            "{:<32} {:>5} {:>6} {:>10.2} {:>6.1}% {:>14}",
            r.name,
            r.ops,
            r.census.dispatches,
            r.seconds * 1e3,
            100.0 * r.share,
            rate
        );
    }
}
