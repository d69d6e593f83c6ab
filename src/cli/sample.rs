//! `kiln sample`: generate text from a checkpoint.

use kiln::generate::{Generator, SamplingParams};
use kiln::{Error, GpuOptions, PrecisionChoice, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// A run folder (its latest checkpoint is used) or a checkpoint folder.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The prompt.
    #[arg(long, default_value = "\n", conflicts_with = "prompt_file")]
    prompt: String,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens.
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// CTRL repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtracted per previous occurrence (0 = off).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Subtracted once if present (0 = off).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 500)]
    max_tokens: usize,
    /// Seed of the draw.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Samples to draw (seeds seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
}

pub fn run(adapter: Option<String>, precision: PrecisionChoice, a: &SampleArgs) -> Result<()> {
    let prompt = match &a.prompt_file {
        Some(p) => std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?,
        None => a.prompt.clone(),
    };
    let generator = Generator::load(&a.checkpoint, &GpuOptions { adapter, precision })?;
    let mut stdout = std::io::stdout();
    for i in 0..a.num_samples {
        let params = SamplingParams {
            temperature: a.temperature,
            top_k: Some(a.top_k),
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            frequency_penalty: a.frequency_penalty,
            presence_penalty: a.presence_penalty,
            max_tokens: a.max_tokens,
            stop: a.stop.clone(),
            seed: a.seed + i as u64,
        };
        let _ = write!(stdout, "{prompt}");
        let g = generator.generate(&prompt, &params, |piece| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        })?;
        let _ = writeln!(stdout);
        if g.truncated_prompt_tokens > 0 {
            eprintln!(
                "note: the prompt was longer than the context; its first {} tokens were dropped",
                g.truncated_prompt_tokens
            );
        }
        let decode_tps = g.tokens.saturating_sub(1) as f64 / g.decode_s.max(1e-9);
        eprintln!(
            "sample {}: {} tokens; prefill {:.1} ms, decode {:.1} tokens/s (whole-window recompute per token)",
            i + 1,
            g.tokens,
            g.prefill_s * 1e3,
            decode_tps
        );
        if a.num_samples > 1 {
            let _ = writeln!(stdout, "---");
        }
    }
    Ok(())
}
