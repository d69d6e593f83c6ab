//! `kiln params`: the parameter count of a config, per component, weights vs biases.

use kiln::model::{Component, Config, ParamKind, ParamLayout, TokenizerKind};
use kiln::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ParamsArgs {
    /// TOML config file.
    #[arg(long)]
    config: PathBuf,
    /// Vocabulary size, when the config leaves it to the tokenizer.
    #[arg(long)]
    vocab: Option<usize>,
    /// Override a config value, e.g. --set model.n_layer=6 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Also build the training model on the GPU (the config's precision and batch) and print
    /// the bytes its buffers took, as kiln's buffer accounting counts them.
    #[arg(long)]
    memory: bool,
}

pub fn run(a: &ParamsArgs) -> Result<()> {
    let config = Config::load(&a.config, &a.overrides)?;
    let vocab = vocab(&config, a.vocab)?;
    let layout = ParamLayout::for_config(&config, vocab, 1)?;
    let fmt = |n: usize| group_digits(n);
    let parts = config.model.parts();
    println!(
        "{} (vocab {vocab}; arch {:?}: {:?}, {:?} positions, {:?} MLP {} wide, {} of {} heads for keys/values)",
        a.config.display(),
        config.model.arch,
        parts.norm,
        parts.positions,
        parts.mlp,
        parts.mlp_hidden,
        parts.n_kv_head,
        config.model.n_head
    );
    println!(
        "{:<12} {:>14} {:>14} {:>14}",
        "component", "weights", "biases", "total"
    );
    for c in Component::ALL {
        let (w, b) = (
            layout.count(c, ParamKind::Weight),
            layout.count(c, ParamKind::Bias),
        );
        let note = if c == Component::Head && parts.tie_embeddings {
            "  (tied to the token embedding)"
        } else {
            ""
        };
        println!(
            "{:<12} {:>14} {:>14} {:>14}{note}",
            c.name(),
            fmt(w),
            fmt(b),
            fmt(w + b)
        );
    }
    let (w, b) = (
        layout.count_kind(ParamKind::Weight),
        layout.count_kind(ParamKind::Bias),
    );
    println!(
        "{:<12} {:>14} {:>14} {:>14}",
        "total",
        fmt(w),
        fmt(b),
        fmt(w + b)
    );
    if let Some(moe) = &config.model.moe {
        let experts = layout.count(Component::Experts, ParamKind::Weight)
            + layout.count(Component::Experts, ParamKind::Bias);
        let active = kiln::model::moe::active_parameters(w + b, experts, moe);
        println!(
            "{:<12} {:>44}  ({} of {} experts per token in each routed layer)",
            "active/token",
            fmt(active),
            moe.top_k,
            moe.n_experts
        );
    }
    let (trainable, frozen) = layout.trainable_and_frozen();
    println!(
        "trainable {} ({:.2}%), frozen {}{}",
        fmt(trainable),
        100.0 * trainable as f64 / layout.num_params().max(1) as f64,
        fmt(frozen),
        adaptation_note(&config)
    );
    for (name, bytes) in [("f16", 2), ("f32", 4)] {
        let state = layout.training_state_bytes(bytes);
        println!(
            "training state with {name} parameters: {} bytes ({:.1} MiB: working copy of every tensor; gradients, f32 master, Adam m and v of the trainable ones)",
            fmt(state),
            state as f64 / (1 << 20) as f64
        );
    }
    if a.memory {
        memory(&config, vocab)?;
    }
    Ok(())
}

/// What the config freezes or adds.
fn adaptation_note(config: &Config) -> String {
    match (&config.lora, config.finetune.freeze.is_empty()) {
        (Some(l), _) => format!(
            " (LoRA rank {} alpha {} on {:?}: the adapters train, the base is frozen)",
            l.rank,
            l.alpha,
            l.targets.iter().map(|t| t.name()).collect::<Vec<_>>()
        ),
        (None, false) => format!(" (finetune.freeze = {:?})", config.finetune.freeze),
        (None, true) => String::new(),
    }
}

/// Builds the training model on the GPU and prints what it allocated.
fn memory(config: &Config, vocab: usize) -> Result<()> {
    let gpu = kiln::Gpu::with_options(&kiln::GpuOptions {
        adapter: None,
        precision: config.train.precision,
    })?;
    let batch = kiln::cpu::gpt::GptBatch {
        batch: config.train.batch_size,
        seq: config.model.block_size,
    };
    // The tuner would time candidates on scratch buffers of each shape (slow here, and counted
    // by the accounting); the fixed rule allocates nothing.
    gpu.tuning().set_enabled(false);
    let before = gpu.allocated_bytes();
    let model = kiln::model::gpu::GptGpu::adapted(
        &gpu,
        &config.model,
        &config.adaptation(),
        vocab,
        batch,
        config.train.grad_accum_steps,
    )?;
    let total = gpu.allocated_bytes() - before;
    let bytes = model.precision().size();
    let state = model.layout().training_state_bytes(bytes);
    println!(
        "GPU bytes allocated for training ({}, batch {}×{}): {} ({:.1} MiB); of which parameters, gradients and optimizer state {} ({:.1} MiB), activations and the rest {}",
        model.precision(),
        batch.batch,
        batch.seq,
        group_digits(total as usize),
        total as f64 / (1 << 20) as f64,
        group_digits(state),
        state as f64 / (1 << 20) as f64,
        group_digits((total as usize).saturating_sub(state))
    );
    Ok(())
}

fn vocab(config: &Config, given: Option<usize>) -> Result<usize> {
    if let Some(v) = given.or((config.model.vocab_size > 0).then_some(config.model.vocab_size)) {
        return Ok(v);
    }
    if config.data.tokenizer == TokenizerKind::Char && !config.data.path.is_empty() {
        let text = std::fs::read_to_string(&config.data.path).map_err(|source| Error::Io {
            path: config.data.path.clone(),
            source,
        })?;
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        return Ok(chars.len());
    }
    if config.data.tokenizer == TokenizerKind::Bpe {
        return Ok(config.data.bpe_vocab_size);
    }
    Err(Error::invalid(
        "model.vocab_size",
        0,
        "the vocabulary comes from the tokenizer: pass --vocab N, set model.vocab_size, or set data.path",
    ))
}

/// 124439808 → "124,439,808".
fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
