//! The run folder of `kiln train`: one writer at a time, no silent reuse, and checks that fail
//! before any expensive set-up rather than after it.
//!
//! A run folder holds `config.toml`, `metrics.jsonl`, `loss.png`, the `step-N` checkpoints and
//! the `latest` pointer (see [`super::checkpoint`]), plus `.lock`, which the training process
//! holds an exclusive advisory lock on for its whole life. The operating system releases the
//! lock when the process ends, however it ends, so a run killed with SIGKILL leaves no stale lock
//! behind; the file itself stays and holds the PID of the last holder, for the message a second
//! writer gets.

use super::checkpoint::{self, BEST_FILE, CONFIG_FILE, LATEST_FILE};
use crate::data::write_atomic;
use crate::model::Config;
use crate::{Error, Result};
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name.
pub const LOCK_FILE: &str = ".lock";
/// The metrics log's name.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss plot's name.
pub const PLOT_FILE: &str = "loss.png";

/// How a run uses its folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// A new run: the folder must not hold one, unless `overwrite`, which removes the old run's
    /// files first.
    Fresh {
        /// Replace a run already in the folder.
        overwrite: bool,
    },
    /// Continue from the latest checkpoint, or from the checkpoint of the given step.
    Resume {
        /// The step to resume from (`None`: the latest).
        from: Option<u64>,
    },
}

/// An open run folder, locked for this process until dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: fs::File,
}

fn run_err(path: &Path, message: impl Into<String>) -> Error {
    Error::RunFolder {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl RunDir {
    /// Creates the folder if needed, proves it writable, takes the lock and applies `mode`'s
    /// rules (see [`RunMode`]). Cheap: call it before loading data or opening the GPU.
    pub fn open(path: &Path, mode: RunMode) -> Result<RunDir> {
        fs::create_dir_all(path).map_err(|e| {
            run_err(
                path,
                format!("cannot be created ({e}); choose another --out or fix its permissions"),
            )
        })?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                run_err(
                    path,
                    format!("cannot be written ({e}); choose another --out or fix its permissions"),
                )
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = match holder.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "another process".to_string(),
                };
                return Err(run_err(
                    path,
                    format!(
                        "another kiln train ({holder}) is writing to it; wait for that run to \
                         end, or train into another --out"
                    ),
                ));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(run_err(path, format!("cannot be locked: {e}")));
            }
        }
        lock.set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| write!(lock, "{}", std::process::id()))
            .and_then(|_| lock.flush())
            .map_err(|e| run_err(path, format!("cannot write its lock file: {e}")))?;
        // The lock file may have existed already; prove that new files can be created too.
        let probe = path.join(format!(".write-test-{}", std::process::id()));
        fs::write(&probe, b"")
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| {
                run_err(
                    path,
                    format!("cannot be written ({e}); choose another --out or fix its permissions"),
                )
            })?;
        let dir = RunDir {
            path: path.to_path_buf(),
            _lock: lock,
        };
        match mode {
            RunMode::Fresh { overwrite } => {
                let found = dir.previous_run()?;
                // A config.toml alone is a run that stopped before its first step (a bad corpus
                // path, a missing adapter, a kill during set-up): nothing is lost by starting
                // over, and refusing would make every fixed typo need --overwrite.
                let started = found.iter().any(|n| n != CONFIG_FILE);
                if started {
                    if !overwrite {
                        return Err(run_err(
                            path,
                            format!(
                                "already holds a run ({}); continue it with --resume, train into \
                                 a fresh --out, or replace it with --overwrite",
                                found.join(", ")
                            ),
                        ));
                    }
                    dir.remove_previous_run()?;
                }
            }
            RunMode::Resume { .. } => {
                if !path.join(CONFIG_FILE).is_file() && checkpoint::latest_dir(path).is_err() {
                    return Err(run_err(
                        path,
                        "holds no run to resume (no config.toml, no checkpoint); start one \
                         without --resume",
                    ));
                }
            }
        }
        Ok(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files and folders of an earlier run in this folder, by name.
    fn previous_run(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let entries = fs::read_dir(&self.path).map_err(|source| Error::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = [CONFIG_FILE, LATEST_FILE, BEST_FILE, METRICS_FILE, PLOT_FILE]
                .contains(&name.as_str())
                || is_step_name(&name);
            if ours {
                found.push(name);
            }
        }
        found.sort();
        Ok(found)
    }

    /// Deletes what [`RunDir::previous_run`] lists (and only that: other files a user keeps in
    /// the folder stay). The pointers `latest` and `best` go first, so an interruption leaves no
    /// pointer to a deleted checkpoint.
    fn remove_previous_run(&self) -> Result<()> {
        let mut names = self.previous_run()?;
        names.sort_by_key(|n| n != LATEST_FILE && n != BEST_FILE);
        for name in names {
            let p = self.path.join(&name);
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Writes the run's config as `config.toml`, atomically (temporary file, fsync, rename), so
    /// that a run killed at any later moment can at least be told apart from an empty folder.
    pub fn write_config(&self, config: &Config) -> Result<()> {
        let text = toml::to_string_pretty(config).map_err(|e| Error::Config {
            message: e.to_string(),
        })?;
        write_atomic(&self.path.join(CONFIG_FILE), text.as_bytes())
    }

    /// Keeps in `metrics.jsonl` only what happened up to the checkpoint of `step` that a resume
    /// starts from: training losses of steps before it and evaluations at or before it. The steps
    /// after it are about to run again; without this they would appear twice. A torn last line
    /// (from a kill mid-write) goes too. Rewritten atomically.
    pub fn truncate_metrics(&self, step: u64) -> Result<()> {
        let path = self.path.join(METRICS_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let mut kept = String::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(s) = v.get("step").and_then(|s| s.as_u64()) else {
                continue;
            };
            // A training-loss line carries the index of the step it measured (0-based); an
            // evaluation line carries the number of steps done when it ran.
            let is_train_loss = v.get("lr").is_some();
            if s < step || (s == step && !is_train_loss) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if kept != text {
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }
}

fn is_step_name(name: &str) -> bool {
    name.strip_prefix("step-")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}
