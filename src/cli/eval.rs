//! The reporting half of `kiln eval`: one checkpoint, or a checkpoint beside another
//! (`--compare`, e.g. a quantised model beside the float one it was made from).

use kiln::quant::weights::ModelWeights;
use kiln::train::eval::{EvalReport, EvalText, eval_weights};
use kiln::{Error, GpuOptions, Result};
use std::path::Path;

pub fn run(
    checkpoint: &Path,
    lora: Option<&Path>,
    compare: Option<&Path>,
    data: Option<&Path>,
    batches: usize,
    full_split: bool,
    options: &GpuOptions,
) -> Result<()> {
    if batches == 0 {
        return Err(Error::invalid(
            "--batches",
            0,
            "must be at least 1 (leave it out to use the config's train.eval_batches)",
        ));
    }
    let text = match (data, full_split) {
        (Some(path), _) => EvalText::File(path),
        (None, true) => EvalText::FullValidation,
        (None, false) => EvalText::Validation {
            max_batches: batches,
        },
    };
    let first = ModelWeights::load_with_adapter(checkpoint, lora)?;
    let others: Vec<&Path> = compare.into_iter().collect();
    let reports = eval_weights(first, &others, text, options)?;
    for r in &reports {
        eprintln!(
            "{}: loss {:.4}, perplexity {:.4} over {} tokens in {:.1} s; weights {}, {} bytes \
             on the GPU",
            r.checkpoint,
            r.loss,
            r.perplexity,
            r.tokens,
            r.seconds,
            r.weights,
            r.weight_bytes.total()
        );
    }
    match reports.as_slice() {
        [r] => println!("{}", serde_json::to_string(r).unwrap_or_default()),
        [r, base] => {
            let change = relative_change(r, base);
            eprintln!(
                "perplexity {:.4} vs {:.4} ({:+.3}%); weights {} vs {} bytes on the GPU ({:.2}× \
                 smaller)",
                r.perplexity,
                base.perplexity,
                100.0 * change,
                r.weight_bytes.total(),
                base.weight_bytes.total(),
                base.weight_bytes.total() as f64 / r.weight_bytes.total().max(1) as f64
            );
            let json = serde_json::json!({
                "model": r,
                "base": base,
                "perplexity_change": change,
            });
            println!("{json}");
        }
        _ => {}
    }
    Ok(())
}

/// (perplexity − base perplexity) / base perplexity.
fn relative_change(r: &EvalReport, base: &EvalReport) -> f64 {
    (r.perplexity - base.perplexity) / base.perplexity
}
