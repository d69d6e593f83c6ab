//! `kiln sweep` end to end on a tiny model: bad specs are refused with the key and the rule, and
//! a sweep killed during a trial or during a journal write resumes with every finished trial
//! kept exactly once.

#[path = "common/run.rs"]
mod run;

use run::{corpus, kiln, tempdir};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A spec over a 1-2 layer model of width 32 trained for `steps` steps a trial, evaluated every 5.
fn tiny_spec(trials: usize, steps: usize, params: &str) -> String {
    format!(
        r#"
[sweep]
method = "random"
trials = {trials}
seed = 5

[base.model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16

[base.train]
batch_size = 4
warmup_steps = 2
eval_batches = 2
eval_interval = 5
checkpoint_interval = 0
max_steps = {steps}
lr = 3e-3
min_lr = 1e-4
final_eval_full_split = false
{params}"#
    )
}

const LR: &str = r#"
[[sweep.param]]
key = "train.lr"
kind = "float"
low = 1e-3
high = 1e-2
log = true
"#;

fn write_spec(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("sweep.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn sweep_args(spec: &Path, data: &Path, out: &Path, resume: bool) -> Vec<String> {
    let mut a: Vec<String> = ["sweep", "--quiet", "--config"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(spec.display().to_string());
    a.extend(["--data".into(), data.display().to_string()]);
    a.extend(["--out".into(), out.display().to_string()]);
    if resume {
        a.push("--resume".into());
    }
    a
}

#[test]
fn bad_specs_are_refused_with_the_key_and_the_rule() {
    let dir = tempdir("sweep-bad");
    let data = corpus(&dir);
    let param = |body: &str| format!("[[sweep.param]]\nkey = \"train.lr\"\n{body}\n");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            tiny_spec(
                3,
                5,
                &param("kind = \"float\"\nlow = 1e-3\nhigh = 1e-2\nlowe = 1"),
            ),
            vec!["unknown field", "lowe"],
        ),
        (
            tiny_spec(3, 5, "[sweep.pruner]\nkind = \"median\"\nwarmup = 3\n"),
            vec!["unknown field", "warmup"],
        ),
        (
            tiny_spec(3, 5, &param("kind = \"float\"\nlow = 1e-2\nhigh = 1e-3")),
            vec!["train.lr", "low", "must not exceed high"],
        ),
        (
            tiny_spec(
                3,
                5,
                "[[sweep.param]]\nkey = \"model.n_layer\"\nkind = \"int\"\nlow = 4\nhigh = 2\n",
            ),
            vec!["model.n_layer", "low = 4", "range is empty"],
        ),
        (
            tiny_spec(
                3,
                5,
                &param("kind = \"float\"\nlow = 0.0\nhigh = 1e-2\nlog = true"),
            ),
            vec!["train.lr", "low = 0", "log range must be > 0"],
        ),
        (
            tiny_spec(
                3,
                5,
                &param("kind = \"float\"\nlow = -1.0\nhigh = 1e-2\nlog = true"),
            ),
            vec!["train.lr", "low = -1", "log range must be > 0"],
        ),
        (
            tiny_spec(3, 5, &param("kind = \"choice\"\nvalues = []")),
            vec!["train.lr", "values", "at least one value"],
        ),
        (tiny_spec(0, 5, LR), vec!["sweep.trials = 0", "at least 1"]),
        (
            tiny_spec(
                3,
                5,
                "[[sweep.param]]\nkey = \"train.learning_rate\"\nkind = \"float\"\nlow = 1e-3\nhigh = 1e-2\n",
            ),
            vec!["train.learning_rate", "not a config key"],
        ),
        (
            tiny_spec(3, 5, &param("kind = \"gaussian\"\nlow = 1e-3\nhigh = 1e-2")),
            vec!["train.lr", "kind", "\"float\", \"int\" or \"choice\""],
        ),
        (
            tiny_spec(
                3,
                5,
                "[[sweep.param]]\nkey = \"model.n_layer\"\nkind = \"float\"\nlow = 1.0\nhigh = 3.0\n",
            ),
            vec!["model.n_layer", "refused by the base config"],
        ),
        (
            tiny_spec(3, 5, "").replace("method = \"random\"", "method = \"annealing\""),
            vec!["sweep.method", "annealing"],
        ),
        (
            tiny_spec(3, 5, &param("kind = \"float\"\nlow = 1e-3\nhigh = 1e-2"))
                .replace("method = \"random\"", "method = \"grid\""),
            vec!["train.lr", "step", "grid search needs a finite grid"],
        ),
    ];
    for (text, needles) in cases {
        let spec = write_spec(&dir, &text);
        let out = dir.join("out");
        let o = kiln()
            .args(sweep_args(&spec, &data, &out, false))
            .output()
            .unwrap();
        let e = stderr(&o);
        assert!(!o.status.success(), "should have failed:\n{text}\n{e}");
        assert!(!e.contains("panicked"), "panicked:\n{e}");
        for n in needles {
            assert!(e.contains(n), "expected {n:?} in:\n{e}\nfor spec:\n{text}");
        }
        assert!(
            !out.join("journal.jsonl").exists(),
            "no sweep started for a bad spec"
        );
    }
}

/// The journal's records, parsed (every line must parse).
fn records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("journal.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn count(records: &[serde_json::Value], event: &str, trial: u64) -> usize {
    records
        .iter()
        .filter(|r| r["event"] == event && r["trial"] == trial)
        .count()
}

/// (state, objective) of each trial in sweep.json.
fn results(out: &Path) -> Vec<(String, f64)> {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    s["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["state"].as_str().unwrap().to_string(),
                t["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn finished_value(records: &[serde_json::Value], trial: u64) -> f64 {
    records
        .iter()
        .find(|r| r["event"] == "finished" && r["trial"] == trial)
        .and_then(|r| r["value"].as_f64())
        .unwrap()
}

#[test]
fn a_sweep_killed_during_a_trial_resumes_without_redoing_finished_trials() {
    let dir = tempdir("sweep-kill");
    let data = corpus(&dir);
    let spec = write_spec(&dir, &tiny_spec(3, 30, LR));
    let out = dir.join("sweep");
    let mut child = kiln()
        .args(sweep_args(&spec, &data, &out, false))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once trial 1 has trained and evaluated at least once (trial 0 is finished by then).
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(out.join("journal.jsonl")).unwrap_or_default();
        if text.contains(r#""event":"report","trial":1"#) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "trial 1 never reported"
        );
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = records(&out);
    assert_eq!(count(&before, "finished", 0), 1);
    assert_eq!(
        count(&before, "finished", 1),
        0,
        "killed before trial 1 ended"
    );
    let value0 = finished_value(&before, 0);

    let o = kiln()
        .args(sweep_args(&spec, &data, &out, true))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 finished trial(s) kept"),
        "{}",
        stderr(&o)
    );
    let after = records(&out);
    for t in 0..3 {
        assert_eq!(count(&after, "finished", t), 1, "trial {t} finished once");
    }
    assert_eq!(count(&after, "created", 0), 1, "trial 0 was not run again");
    assert_eq!(count(&after, "created", 1), 2, "trial 1 ran again");
    assert_eq!(finished_value(&after, 0), value0, "trial 0's result kept");
    let r = results(&out);
    assert_eq!(r.len(), 3);
    assert!(
        r.iter().all(|(s, v)| s == "COMPLETE" && v.is_finite()),
        "{r:?}"
    );
    // The re-run trial started over: its metrics hold each step once.
    let steps = run::train_losses(&out.join("trial-001"));
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (0..30).collect::<Vec<u64>>()
    );
    assert!(out.join("best.toml").is_file() && out.join("sweep.png").is_file());
    // best.toml is a config kiln train accepts.
    kiln::model::Config::load(&out.join("best.toml"), &[]).unwrap();
}

#[test]
fn a_torn_journal_write_is_ignored_and_the_trial_runs_again() {
    let dir = tempdir("sweep-torn");
    let data = corpus(&dir);
    let spec = write_spec(&dir, &tiny_spec(2, 10, LR));
    let out = dir.join("sweep");
    let o = kiln()
        .args(sweep_args(&spec, &data, &out, false))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let value0 = finished_value(&records(&out), 0);
    // A kill in the middle of the last write: trial 1's `finished` record loses its second half
    // and its newline.
    let path = out.join("journal.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let last = text.trim_end().rfind('\n').unwrap() + 1;
    assert!(text[last..].contains(r#""event":"finished","trial":1"#));
    let cut = last + (text.len() - last) / 2;
    std::fs::write(&path, &text[..cut]).unwrap();
    // A second sweep refuses the folder; --resume takes it.
    let again = kiln()
        .args(sweep_args(&spec, &data, &out, false))
        .output()
        .unwrap();
    assert!(!again.status.success() && stderr(&again).contains("--resume"));
    let o = kiln()
        .args(sweep_args(&spec, &data, &out, true))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let after = records(&out); // every line parses: nothing was glued to the torn one
    assert_eq!(count(&after, "finished", 0), 1);
    assert_eq!(count(&after, "finished", 1), 1);
    assert_eq!(count(&after, "created", 0), 1, "trial 0 was not run again");
    assert_eq!(finished_value(&after, 0), value0);
    assert_eq!(results(&out).len(), 2);
    // Resuming a finished sweep runs nothing, and another spec is refused.
    let o = kiln()
        .args(sweep_args(&spec, &data, &out, true))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(records(&out).len(), after.len(), "nothing appended");
    let other = write_spec(&dir, &tiny_spec(2, 10, LR).replace("seed = 5", "seed = 6"));
    let o = kiln()
        .args(sweep_args(&other, &data, &out, true))
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("another spec"),
        "{}",
        stderr(&o)
    );
}
