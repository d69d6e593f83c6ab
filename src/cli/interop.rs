//! `kiln export`, `kiln import` and `kiln logits`: moving models between kiln, `transformers`
//! and llama.cpp, and the logits that show an export computes what kiln computes.

use kiln::generate::Generator;
use kiln::generate::processors::argmax;
use kiln::interop::{GgufType, HfDtype, export_gguf, export_hf, import_hf};
use kiln::{Error, GpuOptions, PrecisionChoice, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A run folder (its latest checkpoint), a pointer (RUN/latest, RUN/best) or a checkpoint
    /// folder, in float.
    #[arg(long)]
    checkpoint: PathBuf,
    /// hf: a transformers folder (config.json, model.safetensors, tokenizer files); gguf: one
    /// GGUF v3 file for llama.cpp.
    #[arg(long, value_parser = ["hf", "gguf"])]
    format: String,
    /// The new folder (hf; must not exist or be empty) or file (gguf; must not exist).
    #[arg(long)]
    out: PathBuf,
    /// hf: precision of the tensors, f32 or f16. [default: f32]
    #[arg(long)]
    dtype: Option<String>,
    /// gguf: f32, f16 (matrices; vectors stay f32) or q8_0 (matrices in llama.cpp's 8-bit
    /// blocks). [default: f32]
    #[arg(long = "type")]
    gguf_type: Option<String>,
}

pub fn export(a: &ExportArgs) -> Result<()> {
    let hf = a.format == "hf";
    let misplaced = match (hf, &a.dtype, &a.gguf_type) {
        (true, _, Some(t)) => Some(("--type", t, "applies to --format gguf; use --dtype")),
        (false, Some(d), _) => Some(("--dtype", d, "applies to --format hf; use --type")),
        _ => None,
    };
    if let Some((flag, value, rule)) = misplaced {
        return Err(Error::invalid(flag, value, rule));
    }
    let out = if hf {
        let dtype = a.dtype.as_deref().unwrap_or("f32").parse::<HfDtype>()?;
        export_hf(&a.checkpoint, &a.out, dtype)?
    } else {
        let ty = a
            .gguf_type
            .as_deref()
            .unwrap_or("f32")
            .parse::<GgufType>()?;
        export_gguf(&a.checkpoint, &a.out, ty)?
    };
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// A Hugging Face GPT-2 or Llama folder: config.json, model.safetensors (or shards with
    /// model.safetensors.index.json), tokenizer.json, optionally generation_config.json.
    #[arg(long)]
    from: PathBuf,
    /// The new run folder (must not exist or be empty): config.toml, step-0, latest.
    #[arg(long)]
    out: PathBuf,
}

pub fn import(a: &ImportArgs) -> Result<()> {
    let dir = import_hf(&a.from, &a.out)?;
    eprintln!("wrote {}", dir.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    /// A run folder, pointer or checkpoint folder (float or quantised).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text whose tokens are scored (at most block_size tokens after encoding).
    #[arg(long, conflicts_with = "text_file")]
    text: Option<String>,
    /// Read the text from a file.
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// Also continue the first --prompt-tokens tokens greedily by this many tokens, each from a
    /// fresh forward pass over the context so far (prompt plus continuation must fit the
    /// context).
    #[arg(long, default_value_t = 0)]
    greedy: usize,
    /// Tokens of the text the greedy continuation starts from.
    #[arg(long, default_value_t = 1)]
    prompt_tokens: usize,
    /// Where to write the JSON ({"text", "tokens", "prompt_tokens", "logits": one row per
    /// token, "greedy"}).
    #[arg(long)]
    out: PathBuf,
}

/// Writes the logits of every position of a text, and a greedy continuation, as JSON: what
/// scripts/check-export.py compares with transformers.
pub fn logits(
    adapter: Option<String>,
    precision: Option<PrecisionChoice>,
    a: &LogitsArgs,
) -> Result<()> {
    let text = match (&a.text, &a.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?,
        (None, None) => {
            return Err(Error::invalid(
                "--text",
                "nothing",
                "give --text or --text-file",
            ));
        }
    };
    let precision = precision.unwrap_or(PrecisionChoice::F32);
    let g = Generator::load(&a.checkpoint, &GpuOptions { adapter, precision })?;
    let tokens = g.tokenizer().encode(&text)?;
    let logits = g.logits_all(&tokens)?;
    let mut greedy = Vec::new();
    if a.greedy > 0 {
        if a.prompt_tokens == 0 || a.prompt_tokens > tokens.len() {
            return Err(Error::invalid(
                "--prompt-tokens",
                a.prompt_tokens,
                format!("must be 1 to the text's {} tokens", tokens.len()),
            ));
        }
        if a.prompt_tokens + a.greedy > g.block_size() {
            return Err(Error::invalid(
                "--greedy",
                a.greedy,
                format!(
                    "the prompt's {} tokens plus the continuation must fit the context of {}",
                    a.prompt_tokens,
                    g.block_size()
                ),
            ));
        }
        let mut context = tokens[..a.prompt_tokens].to_vec();
        for _ in 0..a.greedy {
            let next = argmax(&g.logits_after(&context)?);
            context.push(next);
            greedy.push(next);
        }
    }
    let v = serde_json::json!({
        "text": text,
        "tokens": tokens,
        "prompt_tokens": a.prompt_tokens,
        "logits": logits,
        "greedy": greedy,
    });
    let bytes = serde_json::to_vec(&v).map_err(|e| Error::data(format!("JSON: {e}")))?;
    std::fs::write(&a.out, bytes).map_err(|source| Error::Io {
        path: a.out.display().to_string(),
        source,
    })?;
    eprintln!(
        "{} tokens, {} logits each; greedy continuation of {} tokens; wrote {}",
        tokens.len(),
        logits.first().map_or(0, Vec::len),
        greedy.len(),
        a.out.display()
    );
    Ok(())
}
