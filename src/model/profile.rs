//! Where a training step's time goes: the step timed whole, then each op, grouped by kind with
//! its dispatches, FLOP rate or bandwidth. What `kiln profile` prints and `kiln bench step`
//! summarises.

use super::Config;
use super::gpu::{GptGpu, OpTime};
use crate::cpu::gpt::GptBatch;
use crate::gpu::{Gpu, median};
use crate::kernels::census::Census;
use crate::training::AdamWStep;
use crate::{Error, Result};
use rand::{RngExt, SeedableRng};
use std::time::Instant;

/// How the ops of a profile were timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpTiming {
    /// GPU timestamps around each op's pass inside one submission of the whole step.
    Timestamps,
    /// Each op submitted alone and waited for (wall clock, submit to completion): adapters
    /// without timestamp queries, and `kiln bench step`, which wants each op's own rate.
    Submissions,
}

/// One training step of a config's model, profiled.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepProfile {
    /// E.g. `4-layer, 128-wide, 4-head GPT-2, batch 12 x 64 tokens, vocab 65`.
    pub model: String,
    /// The adapter's name.
    pub adapter: String,
    /// Storage precision (`f16` or `f32`).
    pub precision: String,
    /// Tokens one step trains on.
    pub tokens: usize,
    /// Median wall seconds of the whole step as training submits it (upload, one submission,
    /// wait).
    pub step_s: f64,
    /// Median host seconds to encode the step's command buffer (upload included).
    pub encode_s: f64,
    /// Compute dispatches the step records (the census, not the number of prepared ops).
    pub dispatches: u64,
    /// FLOPs of the step's products (2·M·N·K each, attention included).
    pub flops: f64,
    /// How the ops were timed.
    pub timing: OpTiming,
    /// Every op of the step in recording order.
    pub ops: Vec<OpTime>,
}

/// The ops of one kind (e.g. `matmul::Matmul`) in a profile, summed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KindRow {
    /// The op's type.
    pub name: &'static str,
    /// Ops of this kind in the step.
    pub ops: usize,
    /// Their dispatches, bytes bound and FLOPs.
    pub census: Census,
    /// Their seconds, summed.
    pub seconds: f64,
    /// Share of the ops' summed seconds.
    pub share: f64,
    /// GFLOP/s, for kinds that multiply matrices.
    pub gflops: Option<f64>,
    /// Bytes bound per second, in GB/s: the bandwidth if every bound byte crossed memory once.
    pub gbps: f64,
}

impl StepProfile {
    /// Seconds of the ops, summed.
    pub fn ops_s(&self) -> f64 {
        self.ops.iter().map(|o| o.seconds).sum()
    }

    /// The ops grouped by kind, most time first.
    pub fn by_kind(&self) -> Vec<KindRow> {
        let total = self.ops_s().max(f64::MIN_POSITIVE);
        let mut rows: Vec<KindRow> = Vec::new();
        for op in &self.ops {
            let i = match rows.iter().position(|r| r.name == op.name) {
                Some(i) => i,
                None => {
                    rows.push(KindRow {
                        name: op.name,
                        ops: 0,
                        census: Census::default(),
                        seconds: 0.0,
                        share: 0.0,
                        gflops: None,
                        gbps: 0.0,
                    });
                    rows.len() - 1
                }
            };
            let r = &mut rows[i];
            r.ops += 1;
            r.census += op.census;
            r.seconds += op.seconds;
        }
        for r in &mut rows {
            let s = r.seconds.max(f64::MIN_POSITIVE);
            r.share = r.seconds / total;
            r.gflops = (r.census.flops > 0.0).then(|| r.census.flops / s / 1e9);
            r.gbps = r.census.bytes as f64 / s / 1e9;
        }
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }

    /// FLOPs of the step's products over the whole step's time, in GFLOP/s.
    pub fn model_gflops(&self) -> f64 {
        self.flops / self.step_s.max(f64::MIN_POSITIVE) / 1e9
    }

    /// The rate of the step's matrix products (`matmul::Matmul`) as timed here: their FLOPs
    /// over their seconds, in GFLOP/s. With [`OpTiming::Submissions`] each product ran alone,
    /// so this is the matmul rate at the step's own shapes.
    pub fn matmul_gflops(&self) -> Option<f64> {
        let (flops, s) = self
            .ops
            .iter()
            .filter(|o| o.name == "matmul::Matmul")
            .fold((0.0, 0.0), |(f, s), o| (f + o.census.flops, s + o.seconds));
        (s > 0.0).then(|| flops / s / 1e9)
    }
}

/// Builds the model of `config` for `vocab` tokens on `gpu` with its seeded initial weights and
/// times `runs` whole steps (after one warm-up) on a random batch and each op as `timing` says:
/// with [`OpTiming::Submissions`] each round times a whole step and then every op alone, so
/// the two are measured in the same moments; with timestamps the whole steps come first
/// (adapters without timestamp queries get the submissions timing).
pub fn profile_step(
    gpu: &Gpu,
    config: &Config,
    vocab: usize,
    runs: usize,
    timing: OpTiming,
) -> Result<StepProfile> {
    if runs == 0 {
        return Err(Error::invalid(
            "--runs",
            0,
            "at least one timed run is needed",
        ));
    }
    if vocab < 2 {
        return Err(Error::invalid("--vocab", vocab, "at least 2 tokens"));
    }
    let (m, t) = (&config.model, &config.train);
    let batch = GptBatch {
        batch: t.batch_size,
        seq: m.block_size,
    };
    let model = GptGpu::new(gpu, m, vocab, batch, 1)?;
    model.set_weights(gpu, &super::init::gpt2_init(model.layout(), m, t.seed))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(t.seed);
    let tokens = batch.batch * batch.seq;
    let mut ids = || -> Vec<u32> {
        (0..tokens)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect()
    };
    let micro = vec![(ids(), ids())];
    let adam = AdamWStep::new(1);
    let (mut whole, mut encode) = (Vec::new(), Vec::new());
    // One whole step as training submits it (upload, one submission, wait); round 0 warms up.
    let mut time_step = |round: usize| -> Result<()> {
        let start = Instant::now();
        let e = model.step(gpu, &micro, &adam, |_| {})?;
        gpu.wait()?;
        if round > 0 {
            whole.push(start.elapsed().as_secs_f64());
            encode.push(e);
        }
        Ok(())
    };
    // Timestamps need the adapter's timestamp queries; without them the ops are timed alone.
    let timing = match timing {
        OpTiming::Timestamps if gpu.capabilities().timestamp_query => OpTiming::Timestamps,
        _ => OpTiming::Submissions,
    };
    let ops = match timing {
        // Whole steps first, then the ops inside further steps' submissions.
        OpTiming::Timestamps => {
            for round in 0..=runs {
                time_step(round)?;
            }
            model.set_batch(gpu, &micro[0].0, &micro[0].1)?;
            model.set_step(gpu, &adam, 1)?;
            match model.profile_in_step(gpu, runs)? {
                Some(ops) => ops,
                None => {
                    return Err(Error::invalid(
                        "--timestamps",
                        "set",
                        "the adapter has no timestamp queries; time each op alone (--alone)",
                    ));
                }
            }
        }
        // Each round times a whole step and then each op alone, so the step and its ops (the
        // step efficiency of `kiln bench step` is a ratio of the two) are measured in the same
        // moments. A step leaves its batch and step values in place for the ops.
        OpTiming::Submissions => model.profile_rounds(gpu, runs, &mut time_step)?,
    };
    let arch = match m.arch {
        super::ArchKind::Gpt2 => "GPT-2",
        super::ArchKind::Llama => "Llama",
    };
    Ok(StepProfile {
        model: format!(
            "{}-layer, {}-wide, {}-head {arch}, batch {} x {} tokens, vocab {vocab}",
            m.n_layer, m.n_embd, m.n_head, batch.batch, batch.seq
        ),
        adapter: gpu.capabilities().adapter.name.clone(),
        precision: gpu.precision().to_string(),
        tokens,
        step_s: median(&whole),
        encode_s: median(&encode),
        dispatches: model.dispatches_per_step(gpu, 1),
        flops: ops.iter().map(|o| o.census.flops).sum(),
        timing,
        ops,
    })
}
