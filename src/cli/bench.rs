//! `kiln bench`: kernels on the GPU against the CPU reference.

use super::Args;
use kiln::gpu::{DType, median};
use kiln::kernels::matmul::{Matmul, MatmulVariant};
use kiln::ops::{Layout, MatmulSpec};
use kiln::{Error, Result};
use rand::{RngExt, SeedableRng};
use std::time::Instant;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// C = op(A)·op(B): GFLOP/s of the GPU kernel and of the CPU reference.
    Matmul(MatmulArgs),
    /// One training step of a config's model: the whole step, then each op on its own, grouped
    /// by kernel, to show where the time goes.
    Step(StepArgs),
}

#[derive(clap::Args, Debug)]
pub struct StepArgs {
    /// TOML config file (see configs/); without it, the built-in defaults.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Override a config value, e.g. --set model.n_layer=6 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Vocabulary size of the model (65 is character-level Shakespeare).
    #[arg(long, default_value_t = 65)]
    vocab: usize,
    /// Timed runs of the step and of each op (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print one JSON line (ms/step, tokens/s, model GFLOP/s, the matmul rate at the step's
    /// shapes, step efficiency, dispatches) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct MatmulArgs {
    /// M = N = K (overridden per dimension by --m, --n, --k).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Rows of C.
    #[arg(long)]
    m: Option<usize>,
    /// Columns of C.
    #[arg(long)]
    n: Option<usize>,
    /// Shared dimension.
    #[arg(long)]
    k: Option<usize>,
    /// Operand layout: nn (C = A·B), nt (Y = X·Wᵀ), tn (dW = dYᵀ·X), tt.
    #[arg(long, default_value = "nn")]
    layout: Layout,
    /// Kernel variant: auto (measured per shape), tiled, tiled_vec4, rows, rows_subgroup, rows_subgroup_shuffle or texture.
    #[arg(long, default_value = "auto")]
    variant: String,
    /// Timed GPU runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print one JSON line instead of a sentence.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args, cmd: &BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Matmul(m) => matmul(args, m),
        BenchCommand::Step(s) => step(args, s),
    }
}

fn step(args: &Args, a: &StepArgs) -> Result<()> {
    use kiln::model::profile::{OpTiming, profile_step};
    let config = super::profile::load_config(a.config.as_deref(), &a.overrides)?;
    let gpu = args.open_gpu()?;
    let p = profile_step(&gpu, &config, a.vocab, a.runs, OpTiming::Submissions)?;
    let ops_s = p.ops_s();
    let matmul = p.matmul_gflops();
    if a.json {
        let line = serde_json::json!({
            "model": p.model,
            "adapter": p.adapter,
            "precision": p.precision,
            "ms_per_step": p.step_s * 1e3,
            "tokens_per_s": p.tokens as f64 / p.step_s,
            "model_gflops": p.model_gflops(),
            "matmul_gflops_at_step_shapes": matmul,
            "step_efficiency": matmul.map(|m| p.model_gflops() / m),
            "dispatches_per_step": p.dispatches,
            "encode_ms": p.encode_s * 1e3,
            "ops_alone_ms": ops_s * 1e3,
        });
        println!("{line}");
        return Ok(());
    }
    println!("step of a {}, {} on {}", p.model, p.precision, p.adapter);
    println!(
        "whole step: {:.2} ms ({:.0} tokens/s, {:.2} model GFLOP/s, {} dispatches, {:.2} ms to \
         encode); the {} ops timed alone add up to {:.2} ms",
        p.step_s * 1e3,
        p.tokens as f64 / p.step_s,
        p.model_gflops(),
        p.dispatches,
        p.encode_s * 1e3,
        p.ops.len(),
        ops_s * 1e3
    );
    if let Some(m) = matmul {
        println!(
            "the step's matmuls alone run at {m:.2} GFLOP/s: step efficiency (model GFLOP/s \
             over that) {:.2}",
            p.model_gflops() / m
        );
    }
    let mut phases: Vec<(&str, f64)> = Vec::new();
    for op in &p.ops {
        match phases.iter_mut().find(|x| x.0 == op.phase) {
            Some(x) => x.1 += op.seconds,
            None => phases.push((op.phase, op.seconds)),
        }
    }
    println!(
        "by phase: {}",
        phases
            .iter()
            .map(|(p, s)| format!("{p} {:.2} ms", s * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    super::profile::print_kinds(&p);
    Ok(())
}

fn matmul(args: &Args, a: &MatmulArgs) -> Result<()> {
    let (m, n, k) = (
        a.m.unwrap_or(a.size),
        a.n.unwrap_or(a.size),
        a.k.unwrap_or(a.size),
    );
    if a.runs == 0 {
        return Err(Error::invalid(
            "--runs",
            0,
            "at least one timed run is needed",
        ));
    }
    let gpu = args.open_gpu()?;
    let precision = gpu.precision();
    let spec = MatmulSpec::new(a.layout, m, n, k);
    spec.validate(spec.a_len(), spec.b_len(), None, spec.c_len())?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut random =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
    // The reference sees the inputs exactly as the GPU stores them (rounded to f16 if need be).
    let round = |v: Vec<f32>| -> Vec<f32> {
        match precision {
            kiln::Precision::F16 => v
                .into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect(),
            kiln::Precision::F32 => v,
        }
    };
    let (ha, hb) = (round(random(spec.a_len())), round(random(spec.b_len())));
    let dtype = DType::from(precision);
    let ga = gpu.upload("bench a", &[ha.len()], dtype, &ha)?;
    let gb = gpu.upload("bench b", &[hb.len()], dtype, &hb)?;
    let gc = gpu.zeros("bench c", &[spec.c_len()], dtype)?;
    let mm = match a.variant.as_str() {
        "auto" => Matmul::new(&gpu, &gc, &ga, &gb, None, &spec)?,
        name => {
            let variant = MatmulVariant::ALL
                .into_iter()
                .find(|v| v.name() == name)
                .ok_or_else(|| {
                    Error::invalid(
                        "--variant",
                        name,
                        "expected auto or one of tiled, tiled_vec4, rows, rows_subgroup, rows_subgroup_shuffle, texture",
                    )
                })?;
            Matmul::with_variant(&gpu, variant, &gc, &ga, &gb, None, &spec)?
        }
    };
    let gpu_s = median(&gpu.time_runs("bench matmul", 1, a.runs, |p| mm.record(p))?);

    // The CPU reference: repeat small products so the median means something, run big ones once.
    let mut hc = vec![0.0f32; spec.c_len()];
    let mut cpu_times = Vec::new();
    let cpu_start = Instant::now();
    while cpu_times.len() < 3 && (cpu_times.is_empty() || cpu_start.elapsed().as_secs_f64() < 2.0) {
        let t = Instant::now();
        kiln::cpu::matmul::matmul(&mut hc, &ha, &hb, None, &spec)?;
        cpu_times.push(t.elapsed().as_secs_f64());
    }
    let cpu_s = median(&cpu_times);

    // The timed product is also checked: its largest deviation from the reference is reported.
    let got = gpu.read(&gc)?;
    let max_abs_err = got
        .iter()
        .zip(&hc)
        .map(|(g, c)| (g - c).abs())
        .fold(0.0f32, f32::max);

    let gflops = |s: f64| spec.flops() / s / 1e9;
    let adapter = &gpu.capabilities().adapter.name;
    if a.json {
        let line = serde_json::json!({
            "op": "matmul",
            "m": m,
            "n": n,
            "k": k,
            "layout": a.layout.name(),
            "precision": precision.name(),
            "variant": mm.variant().name(),
            "gpu_gflops": round2(gflops(gpu_s)),
            "cpu_ref_gflops": round2(gflops(cpu_s)),
            "gpu_ms": round2(gpu_s * 1e3),
            "max_abs_err": max_abs_err,
            "adapter": adapter,
        });
        println!("{line}");
    } else {
        println!(
            "matmul {m}x{n}x{k} {} {precision} [{}] on {adapter}: GPU {:.2} GFLOP/s ({:.2} ms), CPU reference {:.2} GFLOP/s, max |GPU - CPU| {max_abs_err:.2e}",
            a.layout.name(),
            mm.variant().name(),
            gflops(gpu_s),
            gpu_s * 1e3,
            gflops(cpu_s)
        );
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
