//! Loss and perplexity of a checkpoint on its validation split or on any text file.

use super::checkpoint;
use crate::cpu::gpt::GptBatch;
use crate::data::{Batch, Dataset, Tokenizer};
use crate::gpu::{Gpu, GpuOptions};
use crate::model::gpu::GptGpu;
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
    if max_batches == 0 {
        return Err(Error::invalid("batches", 0, "must be at least 1"));
    }
    let folder = checkpoint::resolve(dir)?;
    let ck = checkpoint::load(&folder)?;
    let tokenizer = Tokenizer::from_json(&ck.tokenizer_json)?;
    let (t, block) = (&ck.config.train, ck.config.model.block_size);
    let batches: Vec<Batch> = match data {
        Some(path) => windows(
            &tokenizer.encode(&crate::data::read_corpus(path)?)?,
            t.batch_size,
            block,
            &path.display().to_string(),
        )?,
        None => {
            if ck.config.data.path.is_empty() {
                return Err(Error::invalid(
                    "--data",
                    "(none)",
                    "this checkpoint does not record its corpus; pass the text to score with --data FILE",
                ));
            }
            let ds = Dataset::with_tokenizer(
                Path::new(&ck.config.data.path),
                tokenizer.clone(),
                ck.config.data.val_fraction,
                block,
            )?;
            ds.val_batches(t.eval_batches.min(max_batches), t.batch_size, block, t.seed)?
        }
    };
    let gpu = Gpu::with_options(options)?;
    gpu.tuning().set_enabled(false);
    let model = GptGpu::new(
        &gpu,
        &ck.config.model,
        tokenizer.vocab_size(),
        GptBatch {
            batch: t.batch_size,
            seq: block,
        },
        1,
    )?;
    let ck = ck.with_layout(model.layout())?;
    model.set_weights(&gpu, &ck.master)?;
    let (loss, _) = mean_loss(&gpu, &model, &batches)?;
    if !loss.is_finite() {
        return Err(Error::NonFinite {
            what: "loss".into(),
            message: format!(
                "the model in {} gives a loss of {loss} (its logits overflow): its weights are \
                 damaged or the run had diverged when it was saved; evaluate an earlier \
                 checkpoint with --checkpoint RUN/step-N",
                folder.display()
            ),
        });
    }
    let tokens = batches
        .iter()
        .map(|b| b.targets.iter().filter(|&&x| x != u32::MAX).count())
        .sum();
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
        checkpoint: folder.display().to_string(),
    })
}

/// Mean loss per scored token over `batches` (waits for each), and the number of tokens scored;
/// targets equal to `u32::MAX` are not scored.
pub fn mean_loss(gpu: &Gpu, model: &GptGpu, batches: &[Batch]) -> Result<(f64, u64)> {
    let (mut total, mut count) = (0.0f64, 0u64);
    for b in batches {
        model.set_batch(gpu, &b.inputs, &b.targets)?;
        gpu.run_pass("eval", |pass| model.record_eval(pass))?;
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
