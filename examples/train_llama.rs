//! Train a small Llama-style model (RMSNorm, RoPE, SwiGLU, grouped-query attention) on text held
//! in memory with the library's `Trainer`, then evaluate, save and sample it.
//!
//!     cargo run --release --example train_llama [-- CORPUS.txt [STEPS]]
//!
//! Without a corpus it trains on a rhyme generated below, so it runs anywhere; STEPS defaults
//! to 150 (about a minute on a CPU adapter). The checkpoint goes to a temporary folder that
//! `kiln sample --checkpoint` and `kiln eval --checkpoint --data` accept.

use kiln::{Config, Control, Dataset, EvalSet, EvalStats, FitOptions, Observer, SamplingParams};
use kiln::{StepStats, Trainer};

/// A Llama-style baby model: 2 layers, 4 query heads sharing 2 key/value heads.
const CONFIG: &str = r#"
[model]
arch = "llama"
n_layer = 2
n_head = 4
n_kv_head = 2
n_embd = 64
block_size = 32
mlp_hidden = 192

[train]
batch_size = 8
lr = 3e-3
min_lr = 3e-4
warmup_steps = 20
eval_interval = 50
eval_batches = 8
final_eval_full_split = false

[data]
tokenizer = "char"
val_fraction = 0.1
"#;

/// Prints every 25th training loss and every evaluation.
struct PrintLosses;

impl Observer for PrintLosses {
    fn on_step(&mut self, s: &StepStats) -> kiln::Result<Control> {
        if s.step.is_multiple_of(25) {
            println!(
                "step {:4}: loss {:.4}  lr {:.2e}  grad norm {:.3}  {:.0} tok/s",
                s.step, s.loss, s.lr, s.grad_norm, s.tokens_per_s
            );
        }
        Ok(Control::Continue)
    }

    fn on_eval(&mut self, e: &EvalStats) -> kiln::Result<Control> {
        println!("after {} steps: validation loss {:.4}", e.step, e.loss);
        Ok(Control::Continue)
    }
}

/// Some kilobytes of verse from a fixed pseudo-random walk over a few lines, so that there is
/// structure to learn.
fn built_in_text() -> String {
    let lines = [
        "The kiln is warm, the clay is wet,",
        "the potter turns and does not fret;",
        "what fire keeps, the wheel forgets,",
        "and every bowl repays its debts.",
        "So fire the pots and cool them slow,",
        "the glaze will tell what glazes know.",
    ];
    let (mut text, mut state) = (String::new(), 7u64);
    for _ in 0..600 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(lines[(state >> 33) as usize % lines.len()]);
        text.push('\n');
    }
    text
}

fn main() -> kiln::Result<()> {
    env_logger::init();
    let mut args = std::env::args().skip(1);
    let text = match args.next() {
        Some(path) => kiln::data::read_corpus(path.as_ref())?,
        None => built_in_text(),
    };
    let steps = args.next().and_then(|s| s.parse().ok()).unwrap_or(150);
    let config = Config::from_toml(CONFIG, &[format!("train.max_steps={steps}")])?;
    let data = Dataset::from_text(&text, &config.data, config.model.block_size)?;
    println!(
        "{} tokens of text, vocabulary of {}",
        data.tokens().len(),
        data.tokenizer().vocab_size()
    );

    let mut trainer = Trainer::with_default_gpu(config, data)?;
    let summary = trainer.fit(&FitOptions::default(), &mut [&mut PrintLosses])?;
    let full = trainer.evaluate(EvalSet::FullSplit)?;
    println!(
        "{} steps at {:.1} ms/step ({}); whole validation split: loss {:.4} over {} tokens",
        summary.steps, summary.ms_per_step, summary.precision, full.loss, full.tokens
    );

    let out = std::env::temp_dir().join("kiln-train-llama");
    let saved = trainer.save(&out)?;
    println!("checkpoint: {}", saved.path.display());

    let generator = trainer.into_generator()?;
    let params = SamplingParams {
        temperature: 0.8,
        top_k: Some(20),
        max_tokens: 120,
        seed: 1,
        ..SamplingParams::default()
    };
    print!("\nThe kiln");
    generator.generate("The kiln", &params, |piece| print!("{piece}"))?;
    println!();
    Ok(())
}
