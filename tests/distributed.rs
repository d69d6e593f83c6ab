//! Data-parallel training without MPI: the slicing of batches and buffers between ranks, the
//! fixed-order reduction (bit-identical on every rank whatever the timing), the start-up
//! agreement check, the lost-rank deadline, and whole trainers run as ranks in threads
//! ([`kiln::dist::ThreadGroup`]) against one process training on the whole batch.

use kiln::dist::{
    self, Communicator, Fingerprint, ThreadComm, ThreadGroup, all_reduce_mean, owner_range,
    rank_rows, sum_in_rank_order,
};
use kiln::{Config, Dataset, Error, Gpu, GpuOptions, PrecisionChoice, Trainer};
use std::time::{Duration, Instant};

/// Runs `f` on every rank of a group, each in its own thread; results in rank order.
fn on_ranks<T: Send + 'static>(
    comms: Vec<ThreadComm>,
    f: impl Fn(ThreadComm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Deterministic pseudo-random values of mixed magnitude (so that summation order matters).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * 10f32.powi(((x >> 20) % 7) as i32 - 3)
        })
        .collect()
}

#[test]
fn owner_ranges_tile_the_buffer_in_rank_order() {
    for len in [0, 1, 5, 16, 1001] {
        for size in 1..6 {
            let mut next = 0;
            for rank in 0..size {
                let r = owner_range(len, size, rank);
                assert_eq!(r.start, next, "len {len}, {size} ranks, rank {rank}");
                assert!(r.len() == len / size || r.len() == len / size + 1);
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }
}

#[test]
fn rank_rows_split_the_global_batch_and_refuse_a_remainder() {
    // 2 ranks × 6 rows are the 12 rows of one process, in order.
    assert_eq!(rank_rows(12, 2, 0).unwrap(), 0..6);
    assert_eq!(rank_rows(12, 2, 1).unwrap(), 6..12);
    assert_eq!(rank_rows(12, 3, 2).unwrap(), 8..12);
    assert_eq!(rank_rows(12, 1, 0).unwrap(), 0..12);
    for (batch, ranks) in [(12, 5), (3, 4), (7, 2)] {
        let e = rank_rows(batch, ranks, 0).unwrap_err().to_string();
        assert!(
            e.contains("train.batch_size") && e.contains(&format!("({ranks})")),
            "{e}"
        );
    }
}

#[test]
fn the_reduction_is_the_rank_order_mean_on_every_rank_whatever_the_timing() {
    for size in [2usize, 3, 4] {
        let len = 1037;
        let inputs: Vec<Vec<f32>> = (0..size).map(|r| values(len, r as u64 + 7)).collect();
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let expected: Vec<f32> = sum_in_rank_order(&refs)
            .into_iter()
            .map(|x| x / size as f32)
            .collect();
        // The same reduction with the ranks arriving in different orders: later ranks first,
        // then earlier ones first.
        for delay_high in [true, false] {
            let inputs = inputs.clone();
            let results = on_ranks(
                ThreadGroup::connect(size, Duration::from_secs(20)),
                move |mut c: ThreadComm| {
                    let r = c.rank();
                    let wait = if delay_high { r } else { size - 1 - r };
                    std::thread::sleep(Duration::from_millis(15 * wait as u64));
                    let mut data = inputs[r].clone();
                    all_reduce_mean(&mut c, "test", &mut data).unwrap();
                    data
                },
            );
            for (rank, got) in results.iter().enumerate() {
                // Bit for bit: compare the bits, not the values.
                let same = got
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{size} ranks: rank {rank} differs from the rank-order mean"
                );
            }
        }
        // The rank order matters in f32 (so the test above can fail): reversed order differs
        // somewhere for these mixed magnitudes.
        if size >= 3 {
            let reversed: Vec<&[f32]> = refs.iter().rev().copied().collect();
            assert_ne!(sum_in_rank_order(&reversed), sum_in_rank_order(&refs));
        }
    }
}

#[test]
fn a_lost_rank_is_named_within_the_deadline() {
    let timeout = Duration::from_millis(300);
    // Rank 1 is alive but never takes part (stopped): rank 0 gives up after the deadline.
    let mut comms = ThreadGroup::connect(2, timeout);
    let idle = comms.pop().unwrap();
    let mut rank0 = comms.pop().unwrap();
    let start = Instant::now();
    let mut data = vec![1.0f32; 100];
    let e =
        all_reduce_mean(&mut rank0, "the gradient all-reduce of step 7", &mut data).unwrap_err();
    let waited = start.elapsed();
    assert!(matches!(e, Error::RankLost { rank: 1, .. }), "{e}");
    assert_eq!(e.exit_code(), 3);
    let text = e.to_string();
    assert!(text.contains("rank 1") && text.contains("step 7"), "{text}");
    // Within the deadline plus scheduling slack (generous: a loaded CI machine).
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(5),
        "{waited:?}"
    );
    drop(idle);
    // Rank 1 has gone (dropped): noticed at once, and named.
    let mut comms = ThreadGroup::connect(3, timeout);
    let _rank2 = comms.pop().unwrap();
    drop(comms.pop());
    let mut rank0 = comms.pop().unwrap();
    let e = dist::all_gather(&mut rank0, "test", &[1, 2, 3]).unwrap_err();
    assert!(matches!(e, Error::RankLost { rank: 1, .. }), "{e}");
}

#[test]
fn ranks_that_disagree_are_refused_naming_what_differs() {
    let print = |config: &[u8], data: &[u8]| Fingerprint {
        items: vec![
            ("config", dist::digest(config)),
            ("data", dist::digest(data)),
        ],
    };
    let results = on_ranks(
        ThreadGroup::connect(2, Duration::from_secs(20)),
        move |mut c: ThreadComm| {
            let data: &[u8] = if c.rank() == 1 {
                b"other corpus"
            } else {
                b"corpus"
            };
            dist::agree(&mut c, &print(b"config", data)).map_err(|e| e.to_string())
        },
    );
    for r in results {
        let e = r.unwrap_err();
        // Only the data differs, and the message says so (not the config).
        assert!(e.contains("rank 1 disagrees with rank 0 on data ("), "{e}");
    }
    let results = on_ranks(
        ThreadGroup::connect(3, Duration::from_secs(20)),
        move |mut c: ThreadComm| dist::agree(&mut c, &print(b"config", b"corpus")).is_ok(),
    );
    assert_eq!(results, vec![true; 3]);
}

// --- Whole trainers as ranks ---------------------------------------------------------------

fn config(batch: usize, steps: usize) -> Config {
    let overrides: Vec<String> = [
        "model.n_layer=2".to_string(),
        "model.n_head=2".into(),
        "model.n_embd=32".into(),
        "model.block_size=16".into(),
        format!("train.batch_size={batch}"),
        "train.warmup_steps=3".into(),
        format!("train.max_steps={steps}"),
        "train.lr=3e-3".into(),
        "train.eval_interval=1000".into(),
        "train.eval_batches=2".into(),
        "train.checkpoint_interval=0".into(),
        "train.precision=\"f32\"".into(),
    ]
    .to_vec();
    Config::from_toml("", &overrides).unwrap()
}

fn text() -> String {
    let lines = [
        "What light through yonder window breaks?",
        "O, swear not by the moon.",
        "Good night, good night!",
        "These violent delights have violent ends.",
    ];
    (0..300)
        .map(|i| format!("{}\n", lines[(i * 3 + i / 4) % 4]))
        .collect()
}

fn gpu() -> Gpu {
    Gpu::with_options(&GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    })
    .unwrap()
}

/// (per-step losses, validation loss, final weights digest) of one rank.
type Outcome = (Vec<f32>, f64, String);

fn train_rank(comm: Box<dyn Communicator>, batch: usize, steps: usize) -> kiln::Result<Outcome> {
    let c = config(batch, steps);
    let d = Dataset::from_text(&text(), &c.data, c.model.block_size)?;
    let mut t = Trainer::new_in(gpu(), c, d, comm)?;
    let losses = (0..steps)
        .map(|_| t.step().map(|s| s.loss))
        .collect::<kiln::Result<Vec<f32>>>()?;
    let val = t.evaluate(kiln::EvalSet::Periodic)?.loss;
    Ok((losses, val, t.weights_digest()?))
}

#[test]
fn two_ranks_train_like_one_process_on_the_whole_batch() {
    let steps = 6;
    let single = train_rank(Box::new(dist::Single), 4, steps).unwrap();
    let ranks = on_ranks(
        ThreadGroup::connect(2, Duration::from_secs(120)),
        move |c: ThreadComm| train_rank(Box::new(c), 4, steps).unwrap(),
    );
    // Both ranks end with the same weights, bit for bit, and log the same losses.
    assert_eq!(ranks[0].2, ranks[1].2, "the ranks' final weights differ");
    assert_eq!(ranks[0].0, ranks[1].0);
    // Against one process: the per-rank gradients are summed over 2 rows each and then
    // averaged, where one process sums over 4 rows: the same mathematics in a different f32
    // summation order, so equal to rounding (measured ~1e-7 relative; 1e-5 is the bound
    // and far below the step-to-step change of the loss, ~1e-2).
    let mut worst = 0f32;
    for (step, (a, b)) in single.0.iter().zip(&ranks[0].0).enumerate() {
        let rel = ((a - b) / a).abs();
        worst = worst.max(rel);
        assert!(
            rel <= 1e-5,
            "step {step}: one process {a}, two ranks {b} (rel {rel:e})"
        );
    }
    eprintln!("largest relative loss difference, 2 ranks vs 1 process: {worst:e}");
    let rel = ((single.1 - ranks[0].1) / single.1).abs();
    assert!(
        rel <= 1e-5,
        "validation loss {} vs {}",
        single.1,
        ranks[0].1
    );
    assert_eq!(ranks[0].1, ranks[1].1);
}

#[test]
fn a_batch_the_ranks_cannot_share_is_refused() {
    let results = on_ranks(
        ThreadGroup::connect(3, Duration::from_secs(5)),
        move |c: ThreadComm| {
            train_rank(Box::new(c), 4, 1)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        },
    );
    for e in results {
        assert!(e.contains("train.batch_size") && e.contains("(3)"), "{e}");
    }
}
