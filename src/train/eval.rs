//! Loss and perplexity of a checkpoint on its validation split or on any text file.

use crate::cpu::gpt::GptBatch;
use crate::data::{Batch, Dataset, Tokenizer};
use crate::gpu::{Gpu, GpuOptions};
use crate::model::gpu::{GptGpu, WeightBytes};
use crate::quant::weights::ModelWeights;
use crate::{Error, Result};
use std::path::Path;

/// What an evaluation measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    /// Mean cross-entropy per token (nats).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// The checkpoint folder evaluated.
    pub checkpoint: String,
    /// What its weights are: `float`, or the quantisation settings.
    pub weights: String,
    /// Bytes of its weights on the GPU.
    pub weight_bytes: WeightBytes,
    /// Seconds of the forward passes (building the model and reading the corpus excluded).
    pub seconds: f64,
}

/// Which tokens an evaluation scores.
#[derive(Clone, Copy, Debug)]
pub enum EvalText<'a> {
    /// The fixed validation batches of the training corpus recorded in the checkpoint's config
    /// (`train.eval_batches` of them, at most this many).
    Validation {
        /// Most batches to score.
        max_batches: usize,
    },
    /// Every token of that corpus's validation split once, in consecutive windows.
    FullValidation,
    /// Every token of a text file once, in consecutive windows.
    File(&'a Path),
}

/// Evaluates the latest checkpoint under `dir` (or the checkpoint folder `dir`). With `data`,
/// scores the whole file in consecutive windows of the context length; otherwise the fixed
/// validation batches of the training corpus recorded in the checkpoint's config
/// (`max_batches` of them at most).
pub fn eval_checkpoint(
    dir: &Path,
    data: Option<&Path>,
    max_batches: usize,
    options: &GpuOptions,
) -> Result<EvalReport> {
    let text = match data {
        Some(path) => EvalText::File(path),
        None => EvalText::Validation { max_batches },
    };
    let mut reports = eval_checkpoints(&[dir], text, options)?;
    Ok(reports.remove(0))
}

/// Evaluates several checkpoints (float or quantised) on the same tokens: those `text` picks
/// by the first checkpoint's config and tokenizer, which every other must share (a quantised
/// model and the checkpoint it was made from, say). Each model is built for inference in turn
/// on one device.
pub fn eval_checkpoints(
    dirs: &[&Path],
    text: EvalText<'_>,
    options: &GpuOptions,
) -> Result<Vec<EvalReport>> {
    let Some(first) = dirs.first() else {
        return Ok(Vec::new());
    };
    eval_weights(ModelWeights::load(first)?, &dirs[1..], text, options)
}

/// [`eval_checkpoints`] with the first model's weights already loaded (a base with a LoRA
/// adapter attached, say), then the checkpoints `others`.
pub fn eval_weights(
    weights: ModelWeights,
    others: &[&Path],
    text: EvalText<'_>,
    options: &GpuOptions,
) -> Result<Vec<EvalReport>> {
    let first_folder = weights.folder.clone();
    let first = first_folder.as_path();
    let mut dirs = vec![first];
    dirs.extend_from_slice(others);
    let batches = eval_batches(&weights, text)?;
    let tokens = batches
        .iter()
        .map(|b| b.targets.iter().filter(|&&x| x != u32::MAX).count())
        .sum();
    let gpu = Gpu::with_options(options)?;
    gpu.tuning().set_enabled(false);
    let mut reports = Vec::new();
    let tokenizer = weights.tokenizer_json.clone();
    let mut next = Some(weights);
    for (i, dir) in dirs.iter().enumerate() {
        let w = match next.take() {
            Some(w) => w,
            None => ModelWeights::load(dir)?,
        };
        if i > 0 && w.tokenizer_json != tokenizer {
            return Err(Error::invalid(
                "--compare",
                dir.display(),
                format!(
                    "has another tokenizer than {}: the two models do not score the same \
                     tokens",
                    first.display()
                ),
            ));
        }
        let batch = GptBatch {
            batch: batches[0].batch_size,
            seq: batches[0].block_size,
        };
        let model = GptGpu::inference(&gpu, &w, batch)?;
        let t0 = std::time::Instant::now();
        let (loss, _) = mean_loss(&gpu, &model, &batches)?;
        let seconds = t0.elapsed().as_secs_f64();
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                what: "loss".into(),
                message: format!(
                    "the model in {} gives a loss of {loss} (its logits overflow): its weights \
                     are damaged or the run had diverged when it was saved; evaluate an earlier \
                     checkpoint with --checkpoint RUN/step-N",
                    w.folder.display()
                ),
            });
        }
        reports.push(EvalReport {
            loss,
            perplexity: loss.exp(),
            tokens,
            checkpoint: w.folder.display().to_string(),
            weights: w.describe(),
            weight_bytes: model.weight_bytes(),
            seconds,
        });
    }
    Ok(reports)
}

/// The batches `text` describes for the model of `w`, `train.batch_size` windows of its
/// context each.
fn eval_batches(w: &ModelWeights, text: EvalText<'_>) -> Result<Vec<Batch>> {
    let tokenizer = Tokenizer::from_json(&w.tokenizer_json)?;
    let (t, block) = (&w.config.train, w.config.model.block_size);
    let dataset = || {
        if w.config.data.path.is_empty() {
            return Err(Error::invalid(
                "--data",
                "(none)",
                "this checkpoint does not record its corpus; pass the text to score with --data FILE",
            ));
        }
        Dataset::with_tokenizer(
            Path::new(&w.config.data.path),
            tokenizer.clone(),
            w.config.data.val_fraction,
            block,
        )
    };
    match text {
        EvalText::File(path) => windows(
            &tokenizer.encode(&crate::data::read_corpus(path)?)?,
            t.batch_size,
            block,
            &path.display().to_string(),
        ),
        EvalText::Validation { max_batches } => {
            if max_batches == 0 {
                return Err(Error::invalid("batches", 0, "must be at least 1"));
            }
            dataset()?.val_batches(t.eval_batches.min(max_batches), t.batch_size, block, t.seed)
        }
        EvalText::FullValidation => windows(
            dataset()?.val_tokens(),
            t.batch_size,
            block,
            "the validation split",
        ),
    }
}

/// Mean loss per scored token over `batches` (waits for each), and the number of tokens scored;
/// targets equal to `u32::MAX` are not scored.
pub fn mean_loss(gpu: &Gpu, model: &GptGpu, batches: &[Batch]) -> Result<(f64, u64)> {
    let (mut total, mut count) = (0.0f64, 0u64);
    for b in batches {
        model.set_batch(gpu, &b.inputs, &b.targets)?;
        gpu.submit("eval", |encoder| model.record_eval(encoder))?;
        total += gpu
            .read(model.losses())?
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>();
        count += u64::from(gpu.read_u32(model.target_count())?[0]);
    }
    Ok((total / count.max(1) as f64, count))
}

/// Consecutive windows of `block + 1` tokens covering `ids`, `batch` to a batch. The last
/// batch's unused rows and positions get the ignore target (`u32::MAX`), so every token is scored
/// exactly once and nothing is scored twice.
pub(crate) fn windows(ids: &[u32], batch: usize, block: usize, what: &str) -> Result<Vec<Batch>> {
    if ids.len() < 2 {
        return Err(Error::data(format!(
            "{what}: needs at least two tokens to score"
        )));
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let mut inputs = vec![0u32; batch * block];
        let mut targets = vec![u32::MAX; batch * block];
        for row in 0..batch {
            let s = start + row * block;
            for p in 0..block {
                if s + p + 1 < ids.len() {
                    inputs[row * block + p] = ids[s + p];
                    targets[row * block + p] = ids[s + p + 1];
                }
            }
        }
        out.push(Batch {
            inputs,
            targets,
            batch_size: batch,
            block_size: block,
        });
        start += batch * block;
    }
    Ok(out)
}
