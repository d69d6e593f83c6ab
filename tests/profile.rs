//! The dispatch census and the step profile: counts that come from what the step records,
//! checked against counts made another way.

mod common;

use common::gpu;
use kiln::Precision;
use kiln::gpu::DType;
use kiln::kernels::census;
use kiln::kernels::matmul::Matmul;
use kiln::model::profile::{OpTiming, profile_step};
use kiln::model::{Config, ModelConfig};
use kiln::ops::{Layout, MatmulSpec};
use std::process::Command;

fn tiny() -> Config {
    let mut c = Config::from_toml("", &[]).unwrap();
    c.model = ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 12,
        ..ModelConfig::default()
    };
    c.train.batch_size = 3;
    c
}

/// A product notes its dispatches and 2·M·N·K FLOPs once per recording, whatever its variant.
#[test]
fn a_matmul_notes_its_dispatches_and_flops() {
    let gpu = gpu(Precision::F32).unwrap();
    let spec = MatmulSpec::new(Layout::NT, 13, 7, 9);
    let a = gpu.zeros("a", &[spec.a_len()], DType::F32).unwrap();
    let b = gpu.zeros("b", &[spec.b_len()], DType::F32).unwrap();
    let c = gpu.zeros("c", &[spec.c_len()], DType::F32).unwrap();
    let mm = Matmul::new(gpu, &c, &a, &b, None, &spec).unwrap();
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    let once = census::count(|| mm.record(&mut pass));
    let twice = census::count(|| {
        mm.record(&mut pass);
        mm.record(&mut pass);
    });
    assert!(once.dispatches >= 1);
    assert_eq!(once.flops, 2.0 * 13.0 * 7.0 * 9.0);
    assert_eq!(twice.dispatches, 2 * once.dispatches);
    assert_eq!(twice.flops, 2.0 * once.flops);
    // At least the three operands' bytes are bound (f32).
    assert!(
        once.bytes >= 4 * (13 * 9 + 7 * 9 + 13 * 7) as u64,
        "{once:?}"
    );
}

/// The profile covers the whole step: its ops' dispatches add up to the step's count, and
/// their FLOPs to the GPT-2 step's FLOPs counted from the shapes: forward 2·BT·(12·C²·L +
/// C·V) for the linear layers and head plus 4·B·T²·C·L for the attention products (scores and
/// weighted sum over the whole T×T square, as the reference attention multiplies them), and
/// the backward twice the forward (an input and a weight gradient per product, two input
/// gradients per attention product).
#[test]
fn the_profile_covers_the_step_and_counts_its_flops() {
    let gpu = gpu(Precision::F32).unwrap();
    let mut config = tiny();
    config.model.attention_kernel = kiln::model::config::AttentionKernel::Reference;
    let vocab = 11;
    for timing in [OpTiming::Timestamps, OpTiming::Submissions] {
        let p = profile_step(gpu, &config, vocab, 1, timing).unwrap();
        let dispatches: u64 = p.ops.iter().map(|o| o.census.dispatches).sum();
        assert_eq!(dispatches, p.dispatches, "{timing:?}");
        let (b, t, c, l) = (3.0, 12.0, 16.0, 2.0);
        let forward = 2.0 * b * t * (12.0 * c * c * l + c * vocab as f64) + 4.0 * b * t * t * c * l;
        assert_eq!(p.flops, 3.0 * forward, "{timing:?}");
        assert!(
            p.ops
                .iter()
                .all(|o| o.seconds.is_finite() && o.seconds >= 0.0)
        );
        assert!(p.step_s > 0.0 && p.model_gflops() > 0.0);
        let rows = p.by_kind();
        let share: f64 = rows.iter().map(|r| r.share).sum();
        assert!((share - 1.0).abs() < 1e-9, "{share}");
        assert_eq!(
            rows.iter().map(|r| r.ops).sum::<usize>(),
            p.ops.len(),
            "{timing:?}"
        );
    }
    // lavapipe grants timestamp queries, so the default timing is the in-step one here.
    let p = profile_step(gpu, &config, vocab, 1, OpTiming::Timestamps).unwrap();
    assert_eq!(p.timing, OpTiming::Timestamps);
}

/// `profile_rounds` interleaves: the hook runs once alone (round 0, its warm-up) and then before
/// each round of op timings. `profile_step` times its whole
/// steps in that hook, which is what keeps `kiln bench step`'s efficiency ratio from comparing
/// a step and a matmul rate measured minutes apart.
#[test]
fn profile_rounds_time_the_ops_between_the_hook_calls() {
    use kiln::model::gpu::GptGpu;
    use std::time::Instant;
    let gpu = gpu(Precision::F32).unwrap();
    let config = tiny();
    let batch = kiln::cpu::gpt::GptBatch { batch: 3, seq: 12 };
    let model = GptGpu::new(gpu, &config.model, 11, batch, 1).unwrap();
    model
        .set_weights(
            gpu,
            &kiln::model::init::gpt2_init(model.layout(), &config.model, 1),
        )
        .unwrap();
    let ids: Vec<u32> = (0..36).map(|i| i % 11).collect();
    model.set_batch(gpu, &ids, &ids).unwrap();
    model
        .set_step(gpu, &kiln::training::AdamWStep::new(1), 1)
        .unwrap();
    let mut calls: Vec<(usize, Instant)> = Vec::new();
    let ops = model
        .profile_rounds(gpu, 3, |round| {
            calls.push((round, Instant::now()));
            Ok(())
        })
        .unwrap();
    let rounds: Vec<usize> = calls.iter().map(|c| c.0).collect();
    assert_eq!(rounds, [0, 1, 2, 3]);
    assert_eq!(ops.len(), model.profile(gpu, 1).unwrap().len());
    // Between two hook calls after the first, every op ran: the gap holds at least about the sum
    // of the ops' medians (each op runs twice, the second timed).
    // Half of it is the bound, so that one round where most ops ran at under half their median
    // would be needed to fail it by chance (a round of the old order, every op's runs after the
    // last hook call, leaves gaps of microseconds).
    let ops_s: f64 = ops.iter().map(|o| o.seconds).sum();
    assert!(ops_s > 0.0 && ops.iter().all(|o| o.seconds.is_finite()));
    for w in calls[1..].windows(2) {
        let gap = w[1].1.duration_since(w[0].1).as_secs_f64();
        assert!(
            gap > 0.5 * ops_s,
            "{gap} s between hook calls, ops {ops_s} s"
        );
    }
}

fn kiln(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const TINY: [&str; 8] = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=16",
    "--set",
    "model.block_size=8",
    "--set",
    "train.batch_size=2",
];

/// `kiln profile --json` and `kiln bench step --json` print what a script reads.
#[test]
fn the_commands_print_json() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("profile-cli");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let chart = dir.join("profile.png");
    let mut args = vec!["profile", "--steps", "1", "--json", "--chart"];
    args.push(chart.to_str().unwrap());
    args.extend(TINY);
    let v: serde_json::Value = serde_json::from_str(&kiln(&args)).unwrap();
    let ops = v["profile"]["ops"].as_array().unwrap();
    let sum: u64 = ops
        .iter()
        .map(|o| o["census"]["dispatches"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, v["profile"]["dispatches"].as_u64().unwrap());
    assert!(!v["by_kind"].as_array().unwrap().is_empty());
    assert!(std::fs::metadata(&chart).unwrap().len() > 1000);

    let mut args = vec!["bench", "step", "--runs", "1", "--json"];
    args.extend(TINY);
    let v: serde_json::Value = serde_json::from_str(kiln(&args).trim()).unwrap();
    for key in [
        "ms_per_step",
        "tokens_per_s",
        "model_gflops",
        "matmul_gflops_at_step_shapes",
        "step_efficiency",
    ] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{key}: {v}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
