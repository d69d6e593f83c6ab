//! `kiln quantize`: a float checkpoint to 8-bit or 4-bit weights for `kiln sample` and
//! `kiln eval`.

use kiln::Result;
use kiln::quant::QuantSettings;
use kiln::quant::convert::quantize_checkpoint;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// A run folder (its latest checkpoint is used) or a checkpoint folder, in float.
    #[arg(long)]
    checkpoint: PathBuf,
    /// q8: 8-bit integers (llama.cpp's q8_0 bytes); q4: 4-bit integers, eight to a u32
    /// (q4_0's bytes).
    #[arg(long = "type", value_parser = ["q8", "q4"])]
    kind: String,
    /// Inputs per f16 scale: 32 (llama.cpp's blocks), 64 or 128. Must divide every layer's
    /// input width.
    #[arg(long, default_value_t = 32)]
    group_size: usize,
    /// Quantise the token embedding and the output head too. [default: true for q8, false
    /// for q4]
    #[arg(long)]
    embeddings: Option<bool>,
    /// The new folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: &QuantizeArgs) -> Result<()> {
    let settings = QuantSettings::new(a.kind.parse()?, a.group_size, a.embeddings)?;
    let r = quantize_checkpoint(&a.checkpoint, settings, &a.out)?;
    for t in &r.tensors {
        eprintln!(
            "{:<40} {:>5} × {:<5} max error {:.3} steps, rms {:.2e}",
            t.name, t.shape[0], t.shape[1], t.max_error_steps, t.rms_error
        );
    }
    let after = r.packed_bytes + r.scale_bytes + r.float_bytes;
    eprintln!(
        "{} → {}: {} in groups of {} (embeddings {}): {} matrices; {} bytes in f32 → {} \
         ({} packed + {} scales + {} kept in f32), {:.2}× smaller",
        r.source.display(),
        r.out.display(),
        r.settings.kind,
        r.settings.group_size,
        if r.settings.embeddings {
            "quantised"
        } else {
            "in float"
        },
        r.tensors.len(),
        r.f32_bytes,
        after,
        r.packed_bytes,
        r.scale_bytes,
        r.float_bytes,
        r.f32_bytes as f64 / after.max(1) as f64
    );
    println!("{}", serde_json::to_string(&r).unwrap_or_default());
    Ok(())
}
