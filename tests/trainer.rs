//! The library `Trainer` driven directly on text in memory: step statistics against independent
//! computations, evaluation sets, observers that stop a run, save and resume continuing bit for
//! bit, the generator made from a trained model, and the errors of bad input.

use kiln::train::checkpoint;
use kiln::train::schedule::learning_rate;
use kiln::{
    Config, Control, Dataset, Error, EvalSet, EvalStats, FitOptions, Gpu, GpuOptions, Observer,
    PrecisionChoice, SamplingParams, SavedCheckpoint, StepStats, TrainSummary, Trainer,
};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// A tiny model: 2 layers, 32 wide, context 16, batch 4. Extra `key=value` overrides on top.
fn config(precision: &str, extra: &[&str]) -> Config {
    let mut overrides: Vec<String> = [
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=16",
        "train.batch_size=4",
        "train.warmup_steps=3",
        "train.max_steps=40",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.eval_interval=5",
        "train.eval_batches=3",
        "train.checkpoint_interval=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    overrides.push(format!("train.precision=\"{precision}\""));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    Config::from_toml("", &overrides).unwrap()
}

/// A few kilobytes of repetitive verse (so the tiny model can learn something).
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

fn dataset(config: &Config) -> Dataset {
    Dataset::from_text(&text(), &config.data, config.model.block_size).unwrap()
}

/// A device of `precision`, or `None` (with a note) where the adapter has no f16.
fn gpu(precision: &str) -> Option<Gpu> {
    let choice = match precision {
        "f16" => PrecisionChoice::F16,
        _ => PrecisionChoice::F32,
    };
    match Gpu::with_options(&GpuOptions {
        adapter: None,
        precision: choice,
    }) {
        Ok(g) => Some(g),
        Err(e) if precision == "f16" => {
            eprintln!("note: no f16 device ({e}); f16 case skipped");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn trainer(precision: &str, extra: &[&str]) -> Option<Trainer> {
    let c = config(precision, extra);
    let d = dataset(&c);
    Some(Trainer::new(gpu(precision)?, c, d).unwrap())
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn steps_report_what_the_gpu_did() {
    let mut t = trainer("f32", &[]).unwrap();
    let vocab = t.tokenizer().vocab_size() as f32;
    let mut losses = Vec::new();
    for i in 0..30u64 {
        let s = t.step().unwrap();
        assert_eq!(s.step, i);
        assert_eq!(s.lr, learning_rate(&t.config().train, i));
        assert_eq!(s.tokens, 4 * 16);
        assert_eq!(
            (s.loss_scale, s.skipped),
            (1.0, false),
            "f32 has no loss scaling"
        );
        assert!(s.seconds >= 0.0 && s.tokens_per_s > 0.0, "{s:?}");
        // The norm the step reported is the norm of the gradient buffer it left behind (the
        // next step clears it). Tolerance: the GPU sums squares in a tree, the host in order,
        // both in f32 over ~25k values: relative error well under 1e-5 expected, 1e-4 allowed.
        let g = t.model().read_grads(t.gpu()).unwrap();
        let host = g.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt() as f32;
        assert!(
            (s.grad_norm - host).abs() <= 1e-4 * host,
            "step {i}: reported grad norm {} vs {host} from the buffer",
            s.grad_norm
        );
        losses.push(s.loss);
    }
    // GPT-2's initialisation (std 0.02) gives near-uniform predictions: ln(vocab) within 0.1.
    assert!(
        (losses[0] - vocab.ln()).abs() < 0.1,
        "first loss {}",
        losses[0]
    );
    let late = losses[25..].iter().sum::<f32>() / 5.0;
    assert!(
        late < losses[0] - 0.5,
        "loss went from {} to {late}",
        losses[0]
    );
    assert_eq!(t.steps_done(), 30);
    assert_eq!(t.state().tokens_seen, 30 * 64);
}

#[test]
fn evaluation_sets_score_what_they_say() {
    let mut t = trainer("f32", &[]).unwrap();
    for _ in 0..3 {
        t.step().unwrap();
    }
    let periodic = t.evaluate(EvalSet::Periodic).unwrap();
    // The periodic set is the first eval_batches of the fixed batches: the same windows.
    let same = t.evaluate(EvalSet::Batches(3)).unwrap();
    assert_eq!(periodic.loss.to_bits(), same.loss.to_bits());
    assert_eq!(periodic.tokens, 3 * 4 * 16);
    let more = t.evaluate(EvalSet::Batches(5)).unwrap();
    assert_eq!(more.tokens, 5 * 4 * 16);
    assert_ne!(more.loss, periodic.loss);
    // Every validation token but the first is a target exactly once.
    let full = t.evaluate(EvalSet::FullSplit).unwrap();
    assert_eq!(full.tokens as usize, t.dataset().val_tokens().len() - 1);
    assert!(full.loss.is_finite() && full.step == 3);
    // Only the periodic set is kept as the best validation loss.
    assert_eq!(t.state().best_val_loss, Some(periodic.loss));
    let e = t.evaluate(EvalSet::Batches(0)).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
}

/// Records what a run reported, and stops it on a condition.
#[derive(Default)]
struct Recorder {
    steps: Vec<u64>,
    evals: Vec<(u64, EvalSet)>,
    saved: Vec<SavedCheckpoint>,
    ended: Option<u64>,
    stop_at_step: Option<u64>,
    stop_at_eval: bool,
}

impl Observer for Recorder {
    fn on_step(&mut self, s: &StepStats) -> kiln::Result<Control> {
        self.steps.push(s.step);
        Ok(match self.stop_at_step {
            Some(k) if s.step == k => Control::Stop,
            _ => Control::Continue,
        })
    }
    fn on_eval(&mut self, e: &EvalStats) -> kiln::Result<Control> {
        self.evals.push((e.step, e.set));
        Ok(if self.stop_at_eval {
            Control::Stop
        } else {
            Control::Continue
        })
    }
    fn on_checkpoint(&mut self, s: &SavedCheckpoint) -> kiln::Result<Control> {
        self.saved.push(s.clone());
        Ok(Control::Continue)
    }
    fn on_end(&mut self, s: &TrainSummary) -> kiln::Result<()> {
        self.ended = Some(s.steps);
        Ok(())
    }
}

#[test]
fn observers_see_the_schedule_and_can_stop_it() {
    let dir = tempdir("observers");
    // A full run: every step once in order, evaluations every 5 steps, then the full split.
    let mut t = trainer(
        "f32",
        &["train.max_steps=12", "train.checkpoint_interval=5"],
    )
    .unwrap();
    let mut r = Recorder::default();
    let options = FitOptions {
        checkpoint_dir: Some(&dir.join("full")),
        ..FitOptions::default()
    };
    let s = t.fit(&options, &mut [&mut r]).unwrap();
    assert_eq!(s.steps, 12);
    assert_eq!(r.steps, (0..12).collect::<Vec<_>>());
    let periodic = |n| (n, EvalSet::Periodic);
    assert_eq!(
        r.evals,
        [
            periodic(5),
            periodic(10),
            periodic(12),
            (12, EvalSet::FullSplit)
        ]
    );
    let saved: Vec<u64> = r.saved.iter().map(|c| c.step).collect();
    assert_eq!(saved, [5, 10, 12]);
    assert_eq!(s.checkpoint.as_ref(), Some(&r.saved[2].path));
    assert!(s.full_val_loss.is_some() && r.ended == Some(12));

    // Stopped at an evaluation: exactly that step, evaluated and saved, no full split.
    let mut t = trainer("f32", &[]).unwrap();
    let mut r = Recorder {
        stop_at_eval: true,
        ..Recorder::default()
    };
    let options = FitOptions {
        checkpoint_dir: Some(&dir.join("eval")),
        ..FitOptions::default()
    };
    let s = t.fit(&options, &mut [&mut r]).unwrap();
    assert_eq!((s.steps, r.evals.clone()), (5, vec![periodic(5)]));
    assert_eq!(r.saved.iter().map(|c| c.step).collect::<Vec<_>>(), [5]);
    assert!(s.full_val_loss.is_none());
    assert_eq!(checkpoint::read_state(&r.saved[0].path).unwrap().step, 5);

    // Stopped from a step's statistics, which come back while up to 4 newer steps are in
    // flight: those finish and are reported too, then the run evaluates and saves.
    let mut t = trainer("f32", &[]).unwrap();
    let mut r = Recorder {
        stop_at_step: Some(2),
        ..Recorder::default()
    };
    let s = t.fit(&FitOptions::default(), &mut [&mut r]).unwrap();
    assert!((3..=7).contains(&s.steps), "stopped at {}", s.steps);
    assert_eq!(r.steps, (0..s.steps).collect::<Vec<_>>());
    assert_eq!(r.evals.last(), Some(&periodic(s.steps)));
    assert!(r.saved.is_empty(), "no checkpoint_dir, no checkpoint");

    // The stop flag (Ctrl-C) set before the run: one step, evaluated.
    let mut t = trainer("f32", &[]).unwrap();
    let mut r = Recorder::default();
    let stop = AtomicBool::new(true);
    let options = FitOptions {
        stop: Some(&stop),
        ..FitOptions::default()
    };
    let s = t.fit(&options, &mut [&mut r]).unwrap();
    assert_eq!((s.steps, r.evals), (1, vec![periodic(1)]));
}

/// Runs `n` steps and returns their losses as bits.
fn losses(t: &mut Trainer, n: usize) -> Vec<u32> {
    (0..n).map(|_| t.step().unwrap().loss.to_bits()).collect()
}

/// Saves after 4 steps, resumes in a new trainer (from the folder, and from the checkpoint in
/// memory) and checks that the next steps' losses and the final weights are bit-identical to an
/// uninterrupted run. Dropout and two micro-batches make the per-step streams matter; f16
/// adds the dynamic loss scale, which grows every 2 clean steps here (from 1024, far below
/// where these gradients would overflow f16).
fn resume_is_exact(precision: &str) {
    let extra = [
        "model.dropout=0.1",
        "train.grad_accum_steps=2",
        "train.loss_scale_growth_interval=2",
        "train.init_loss_scale=1024",
    ];
    let Some(mut whole) = trainer(precision, &extra) else {
        return;
    };
    let expected = losses(&mut whole, 9);
    let weights = whole.master_weights().unwrap();
    let scale = whole.state().loss_scale;

    let dir = tempdir(&format!("resume-{precision}"));
    let mut first = trainer(precision, &extra).unwrap();
    assert_eq!(losses(&mut first, 4), expected[..4]);
    let saved = first.save(&dir).unwrap();
    assert_eq!(saved.path, dir.join("step-4"));
    let in_memory = first.checkpoint().unwrap();
    drop(first);

    let c = config(precision, &extra);
    let mut resumed = Trainer::resume(gpu(precision).unwrap(), &dir, dataset(&c)).unwrap();
    assert_eq!(resumed.steps_done(), 4);
    assert_eq!(
        losses(&mut resumed, 5),
        expected[4..],
        "{precision}: resumed losses"
    );
    assert_eq!(resumed.master_weights().unwrap(), weights);
    assert_eq!(resumed.state().loss_scale, scale);
    if precision == "f16" {
        assert!(
            scale > c.train.init_loss_scale as f32,
            "the scale never grew"
        );
    }

    let mut again =
        Trainer::from_checkpoint(gpu(precision).unwrap(), c.clone(), dataset(&c), in_memory)
            .unwrap();
    assert_eq!(losses(&mut again, 5), expected[4..]);
}

#[test]
fn save_then_resume_continues_bit_identically_f32() {
    resume_is_exact("f32");
}

#[test]
fn save_then_resume_continues_bit_identically_f16() {
    resume_is_exact("f16");
}

#[test]
fn the_trained_model_samples_like_its_checkpoint() {
    let mut t = trainer("f32", &[]).unwrap();
    for _ in 0..10 {
        t.step().unwrap();
    }
    let dir = tempdir("generator");
    t.save(&dir).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 12,
        ..SamplingParams::default()
    };
    let from_trainer = t.into_generator().unwrap();
    let a = from_trainer.generate("O, ", &params, |_| {}).unwrap();
    let options = GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    };
    let loaded = kiln::Generator::load(&dir, &options).unwrap();
    let b = loaded.generate("O, ", &params, |_| {}).unwrap();
    assert_eq!(a.tokens, 12);
    assert_eq!(a.ids, b.ids);
}

#[test]
fn bad_input_is_a_clear_error() {
    // A device of another precision than the config asks for.
    if let Some(f16) = gpu("f16") {
        let c = config("f32", &[]);
        let e = Trainer::new(f16, c.clone(), dataset(&c)).err().unwrap();
        assert!(e.to_string().contains("train.precision"), "{e}");
    }
    // A dataset too short for the context.
    let c = config("f32", &["model.block_size=64"]);
    // 360 characters: a validation split of 36, enough for a context of 16, not of 64.
    let short = Dataset::from_text(&"abcdefgh ".repeat(40), &c.data, 16).unwrap();
    let e = Trainer::new(gpu("f32").unwrap(), c, short).err().unwrap();
    assert!(e.to_string().contains("shorter than one block"), "{e}");
    // Resuming with a dataset of another tokenizer.
    let dir = tempdir("bad-input");
    let mut t = trainer("f32", &[]).unwrap();
    t.step().unwrap();
    t.save(&dir).unwrap();
    let c = config("f32", &[]);
    let other = Dataset::from_text("xyz ".repeat(200).as_str(), &c.data, 16).unwrap();
    let e = Trainer::resume(gpu("f32").unwrap(), &dir, other)
        .err()
        .unwrap();
    assert!(e.to_string().contains("tokenizer"), "{e}");
    // Empty text.
    let e = Dataset::from_text("", &c.data, 16).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn a_diverged_trainer_saves_nothing() {
    let dir = tempdir("diverged");
    let mut t = trainer("f32", &[]).unwrap();
    t.step().unwrap();
    let mut ck = t.checkpoint().unwrap();
    drop(t);
    // What a diverged run leaves: NaN weights (the loader refuses them from a file; a
    // checkpoint in memory is taken as it is).
    ck.master.fill(f32::NAN);
    let c = ck.config.clone();
    let mut t = Trainer::from_checkpoint(gpu("f32").unwrap(), c.clone(), dataset(&c), ck).unwrap();
    match t.step() {
        Err(Error::NonFinite { what, .. }) => assert_eq!(what, "training loss"),
        other => panic!("expected a non-finite loss, got {other:?}"),
    }
    let e = t.save(&dir).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(
        checkpoint::latest_dir(&dir).is_err(),
        "a checkpoint was written"
    );
}
