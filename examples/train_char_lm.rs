//! Train a character-level GPT through the library API, then sample from it.
//!
//!     cargo run --release --example train_char_lm -- CORPUS.txt [OUT_DIR] [STEPS]
//!
//! The baby-GPT settings of configs/shakespeare-char-baby.toml, written out as a struct here,
//! train for STEPS steps (default 300: a few minutes on a CPU adapter); Ctrl-C stops with a
//! checkpoint. Run it again with the same OUT_DIR and more steps to continue.

use kiln::generate::processors::SamplingParams;
use kiln::generate::sampler::Generator;
use kiln::model::{Config, ModelConfig, TrainConfig};
use kiln::train::{TrainOptions, train};
use kiln::{GpuOptions, PrecisionChoice};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn main() -> kiln::Result<()> {
    env_logger::init();
    let mut args = std::env::args().skip(1);
    let Some(data) = args.next().map(PathBuf::from) else {
        eprintln!("usage: train_char_lm CORPUS.txt [OUT_DIR] [STEPS]");
        std::process::exit(2);
    };
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| "runs/example".into()));
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(300);

    let config = Config {
        model: ModelConfig {
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            bias: false,
            dropout: 0.0,
            ..ModelConfig::default()
        },
        train: TrainConfig {
            batch_size: 12,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: steps.min(100) / 2,
            max_steps: steps,
            eval_interval: (steps / 4).max(1),
            checkpoint_interval: (steps / 2).max(1),
            ..TrainConfig::default()
        },
        ..Config::default()
    };
    let resume = out_dir.join("latest").exists();
    let summary = train(
        &TrainOptions {
            config,
            data,
            out_dir: out_dir.clone(),
            resume,
            progress: true,
            adapter: None,
            stop_after: None,
            init_from: None,
            resume_from: None,
            overwrite: !resume,
        },
        &AtomicBool::new(false),
        &mut [],
    )?;
    println!(
        "{} steps, validation loss {:.4}, {:.0} tokens/s ({})",
        summary.steps,
        summary.val_loss.unwrap_or(f64::NAN),
        summary.tokens_per_s,
        summary.precision
    );

    let generator = Generator::load(
        &out_dir,
        &GpuOptions {
            adapter: None,
            precision: PrecisionChoice::Auto,
        },
    )?;
    let params = SamplingParams {
        temperature: 0.8,
        top_k: Some(40),
        max_tokens: 300,
        seed: 7,
        ..SamplingParams::default()
    };
    generator.generate("ROMEO:\n", &params, |piece| print!("{piece}"))?;
    println!("\n\nloss curve: {}", out_dir.join("loss.png").display());
    Ok(())
}
