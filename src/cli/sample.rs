//! `kiln sample`: generate text from a checkpoint.

use kiln::generate::Generator;
use kiln::{Error, GpuOptions, PrecisionChoice, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// A run folder (its latest checkpoint), one of its pointers (RUN/latest, RUN/best: the
    /// lowest validation loss of an early-stopping run) or a checkpoint folder (RUN/step-N).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The prompt.
    #[arg(long, default_value = "\n", conflicts_with = "prompt_file")]
    prompt: String,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Softmax temperature; 0 is greedy. [default: the checkpoint config's [sample] table, else 0.8]
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep the k most likely tokens. [default: [sample], else 200]
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1]. [default: [sample], else 1]
    #[arg(long)]
    top_p: Option<f32>,
    /// CTRL repetition penalty (1 = off). [default: [sample], else 1]
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Subtracted per previous occurrence (0 = off). [default: [sample], else 0]
    #[arg(long)]
    frequency_penalty: Option<f32>,
    /// Subtracted once if present (0 = off). [default: [sample], else 0]
    #[arg(long)]
    presence_penalty: Option<f32>,
    /// Stop before this text (repeatable; replaces [sample]'s list).
    #[arg(long)]
    stop: Vec<String>,
    /// Tokens to generate at most. [default: [sample], else 500]
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Seed of the draw. [default: [sample], else 1337]
    #[arg(long)]
    seed: Option<u64>,
    /// Apply this LoRA adapter (a PEFT folder, e.g. a kiln LoRA run or its RUN/latest) to the
    /// checkpoint's weights.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Settings from this TOML file's [sample] table instead of the checkpoint's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Samples to draw (seeds seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// What happens when prompt and output fill the context. `restart` (the default) keeps the
    /// last half of the context, prefills it again and goes on with the key/value cache: one
    /// cheap decode step per token, but the text differs from a sliding window's. `slide` is
    /// nanoGPT's exact sliding window: it recomputes the whole context for every token past it,
    /// a full forward pass per token (about block_size times the work of a decode step).
    #[arg(long, default_value = "restart", value_parser = ["restart", "slide"])]
    window: String,
    /// Recompute the whole context for every token instead of decoding it with the key/value
    /// cache: the same text (same window rule), about block_size times the work per token; for
    /// checking and timing the cache.
    #[arg(long)]
    no_kv_cache: bool,
}

pub fn run(
    adapter: Option<String>,
    precision: Option<PrecisionChoice>,
    a: &SampleArgs,
) -> Result<()> {
    let prompt = match &a.prompt_file {
        Some(p) => std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?,
        None => a.prompt.clone(),
    };
    if a.num_samples == 0 {
        return Err(Error::invalid("--num-samples", 0, "must be at least 1"));
    }
    // The checkpoint's [sample] table (or --config's), then each flag given; checked before the
    // model is loaded.
    let checkpoint_config =
        kiln::train::checkpoint::read_config(&kiln::train::checkpoint::resolve(&a.checkpoint)?)?;
    let precision = PrecisionChoice::resolve(precision, checkpoint_config.train.precision);
    let mut base = match &a.config {
        Some(path) => kiln::model::Config::load(path, &[])?.sample,
        None => checkpoint_config.sample,
    };
    let set = |v: Option<f32>, field: &mut f32| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(a.temperature, &mut base.temperature);
    set(a.top_p, &mut base.top_p);
    set(a.repetition_penalty, &mut base.repetition_penalty);
    set(a.frequency_penalty, &mut base.frequency_penalty);
    set(a.presence_penalty, &mut base.presence_penalty);
    if let Some(k) = a.top_k {
        base.top_k = Some(k);
    }
    if let Some(n) = a.max_tokens {
        base.max_tokens = n;
    }
    if let Some(seed) = a.seed {
        base.seed = seed;
    }
    if !a.stop.is_empty() {
        base.stop = a.stop.clone();
    }
    base.validate()?;
    let lora = a.lora.as_deref().map(super::train::adapter_dir);
    let weights =
        kiln::quant::weights::ModelWeights::load_with_adapter(&a.checkpoint, lora.as_deref())?;
    let mut generator =
        Generator::from_model_weights(&weights, &GpuOptions { adapter, precision })?;
    generator.set_window(a.window.parse()?);
    generator.set_kv_cache(!a.no_kv_cache);
    let how = if generator.uses_kv_cache() {
        "key/value cache"
    } else {
        "recomputing the context"
    };
    // A prompt the tokenizer cannot encode fails before anything is printed.
    generator.tokenizer().encode(&prompt)?;
    let mut stdout = std::io::stdout();
    let bytes = generator.weight_bytes();
    eprintln!(
        "weights ({}): {} bytes on the GPU ({} float, {} packed integers, {} scales); {} bytes \
         of scratch textures",
        generator.weights_description(),
        bytes.total(),
        bytes.float,
        bytes.packed,
        bytes.scales,
        generator.scratch_bytes()
    );
    for i in 0..a.num_samples {
        let mut params = base.clone();
        params.seed = base.seed + i as u64;
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
            "sample {}: {} tokens; prefill {} prompt tokens in {:.1} ms ({:.0} tokens/s), decode {:.1} tokens/s ({how})",
            i + 1,
            g.tokens,
            g.prompt_tokens,
            g.prefill_s * 1e3,
            g.prompt_tokens as f64 / g.prefill_s.max(1e-9),
            decode_tps
        );
        if a.num_samples > 1 {
            let _ = writeln!(stdout, "---");
        }
    }
    Ok(())
}
