//! `mpirun -np 2 kiln train` (cargo feature `mpi`; needs OpenMPI's `mpirun` on the PATH, as
//! .ci/run installs it): two ranks on a tiny config log the losses of one process training on
//! the whole batch, end with bit-identical weights, and a rank that is stopped makes the other
//! exit with the lost rank named; the run then resumes with a different number of ranks.
#![cfg(feature = "mpi")]

#[path = "common/run.rs"]
mod run;

use run::{corpus, kiln, tempdir, tiny_args};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun` with the options this test machine needs: ranks may outnumber cores
/// (`--oversubscribe`), and CI runs as root (OpenMPI refuses root unless told).
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_kiln"));
    c
}

/// The two tests' jobs take turns: two ranks each on two cores already oversubscribe them, and
/// the lost-rank test's short deadline must not be spent waiting for the other job's ranks.
static ONE_JOB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn args(data: &Path, out: &Path, steps: u32) -> Vec<String> {
    let mut a = tiny_args(data, out, steps);
    a.extend(
        [
            "--set",
            "train.precision=\"f32\"",
            "--set",
            "train.final_eval_full_split=false",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON summaries a run printed on stdout (one per rank).
fn summaries(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// step → train loss (f32 as logged).
fn losses(out: &Path) -> Vec<(u64, f64)> {
    run::train_losses(out)
        .into_iter()
        .map(|(s, l)| (s, l.parse().unwrap()))
        .collect()
}

#[test]
fn two_ranks_log_the_losses_of_one_process_and_end_with_identical_weights() {
    let _turn = ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempdir("mpi-two-ranks");
    let data = corpus(&dir);
    let steps = 12;
    let single = kiln()
        .args(args(&data, &dir.join("one"), steps))
        .output()
        .unwrap();
    check("one process", &single);
    let two = mpirun(2)
        .args(args(&data, &dir.join("two"), steps))
        .output()
        .expect("mpirun (OpenMPI) must be installed to test the mpi feature");
    check("mpirun -np 2", &two);

    // Both ranks report, with the same final weights (each rank also checked this itself).
    let s = summaries(&two);
    assert_eq!(s.len(), 2, "{}", String::from_utf8_lossy(&two.stdout));
    assert!(s.iter().all(|v| v["ranks"] == 2));
    let hash = s[0]["weights_sha256"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);
    assert_eq!(s[1]["weights_sha256"].as_str(), Some(hash.as_str()));

    // The same losses as one process on the whole batch, to f32 rounding: the ranks' gradient
    // sums are grouped differently (2 rows + 2 rows, averaged, against 4 rows), ~1e-7 relative
    // measured; 1e-5 is the bound.
    let (a, b) = (losses(&dir.join("one")), losses(&dir.join("two")));
    assert_eq!(a.len(), steps as usize);
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        let rel = ((x - y) / x).abs();
        assert!(
            rel <= 1e-5,
            "step {step}: one process {x}, two ranks {y} (rel {rel:e})"
        );
    }
    // Rank 0 alone wrote the run folder: one metrics file, with each step once.
    assert_eq!(b.len(), steps as usize);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid of the `kiln` process that is rank `rank` of a job whose command line mentions
/// `marker` (found through /proc).
fn rank_pid(rank: usize, marker: &str) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmdline);
        if cmd.contains(marker)
            && !cmd.starts_with("mpirun")
            && environ.split(|&b| b == 0).any(|v| v == want.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_stopped_rank_is_named_and_the_run_resumes_with_another_rank_count() {
    let _turn = ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempdir("mpi-lost-rank");
    let data = corpus(&dir);
    let out = dir.join("run");
    let timeout_s = 10.0;
    // Long enough that rank 1 is stopped mid-run; checkpoints every 30 steps.
    let mut child = mpirun(2)
        .env("KILN_DIST_TIMEOUT", timeout_s.to_string())
        .args(args(&data, &out, 400))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint, then stop rank 1 (SIGSTOP: alive, silent).
    let start = Instant::now();
    while !out.join("step-30").is_dir() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint in 300 s"
        );
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the run ended before its step-30 checkpoint:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let marker = out.to_str().unwrap();
    let pid = rank_pid(1, marker).expect("rank 1's process");
    let stopped = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let result = child.wait_with_output().unwrap();
    let waited = stopped.elapsed().as_secs_f64();
    // mpirun tears the stopped rank down once rank 0 has gone; make sure it is not left.
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "the job should fail: {stderr}");
    assert!(stderr.contains("rank 1 did not answer"), "{stderr}");
    // Rank 0 waits at most the deadline after its last exchange began; mpirun's tear-down and
    // the step in flight add a few seconds.
    assert!(waited < timeout_s + 20.0, "took {waited:.1} s");

    // Resume from the last checkpoint with ONE process (the global batch is unchanged), to 15
    // steps past it.
    let last = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    let resumed = kiln()
        .args([
            "train",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            "--resume",
        ])
        .args(["--data", data.to_str().unwrap()])
        .args(["--set", &format!("train.max_steps={}", last + 15)])
        .output()
        .unwrap();
    check("resume with 1 rank", &resumed);
    let s = summaries(&resumed);
    assert_eq!(s[0]["steps"], last + 15);
    let _ = std::fs::remove_dir_all(&dir);
}
