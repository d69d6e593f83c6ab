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
    use kiln::cpu::gpt::GptBatch;
    use kiln::model::Config;
    use kiln::model::gpu::GptGpu;
    if a.runs == 0 {
        return Err(Error::invalid(
            "--runs",
            0,
            "at least one timed run is needed",
        ));
    }
    if a.vocab < 2 {
        return Err(Error::invalid("--vocab", a.vocab, "at least 2 tokens"));
    }
    let config = match &a.config {
        Some(path) => Config::load(path, &a.overrides)?,
        None => Config::from_toml("", &a.overrides)?,
    };
    let gpu = args.open_gpu()?;
    let (m, t) = (&config.model, &config.train);
    let batch = GptBatch {
        batch: t.batch_size,
        seq: m.block_size,
    };
    let model = GptGpu::new(&gpu, m, a.vocab, batch, 1)?;
    model.set_weights(
        &gpu,
        &kiln::model::init::gpt2_init(model.layout(), m, t.seed),
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(t.seed);
    let tokens = batch.batch * batch.seq;
    let mut ids = || -> Vec<u32> {
        (0..tokens)
            .map(|_| rng.random_range(0..a.vocab as u32))
            .collect()
    };
    let micro = vec![(ids(), ids())];
    let adam = kiln::training::AdamWStep::new(1);
    // The whole step as training submits it.
    let mut whole = Vec::new();
    for i in 0..=a.runs {
        let start = Instant::now();
        model.step(&gpu, &micro, &adam, |_| {})?;
        gpu.wait()?;
        if i > 0 {
            whole.push(start.elapsed().as_secs_f64());
        }
    }
    let whole = median(&whole);
    model.set_batch(&gpu, &micro[0].0, &micro[0].1)?;
    model.set_step(&gpu, &adam, 1)?;
    let ops = model.profile(&gpu, a.runs)?;
    let sum: f64 = ops.iter().map(|o| o.seconds).sum();

    // Grouped by kernel type, largest first.
    let mut groups: Vec<(&str, usize, f64)> = Vec::new();
    for op in &ops {
        match groups.iter_mut().find(|g| g.0 == op.name) {
            Some(g) => {
                g.1 += 1;
                g.2 += op.seconds;
            }
            None => groups.push((op.name, 1, op.seconds)),
        }
    }
    groups.sort_by(|x, y| y.2.total_cmp(&x.2));
    let mut phases: Vec<(&str, f64)> = Vec::new();
    for op in &ops {
        match phases.iter_mut().find(|p| p.0 == op.phase) {
            Some(p) => p.1 += op.seconds,
            None => phases.push((op.phase, op.seconds)),
        }
    }
    println!(
        "step of a {}-layer, {}-wide, {}-head {}, batch {} x {} tokens, vocab {}, {} on {}",
        m.n_layer,
        m.n_embd,
        m.n_head,
        match m.arch {
            kiln::ArchKind::Gpt2 => "GPT-2",
            kiln::ArchKind::Llama => "Llama",
        },
        batch.batch,
        batch.seq,
        a.vocab,
        gpu.precision(),
        gpu.capabilities().adapter.name
    );
    println!(
        "whole step: {:.2} ms ({:.0} tokens/s); the {} ops timed alone add up to {:.2} ms",
        whole * 1e3,
        tokens as f64 / whole,
        ops.len(),
        sum * 1e3
    );
    println!(
        "by phase: {}",
        phases
            .iter()
            .map(|(p, s)| format!("{p} {:.2} ms", s * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<32} {:>5} {:>10} {:>7}",
        "op", "count", "total ms", "share"
    );
    for (name, count, s) in groups {
        println!(
            "{name:<32} {count:>5} {:>10.2} {:>6.1}%",
            s * 1e3,
            100.0 * s / sum
        );
    }
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
