//! The sweep's journal: `journal.jsonl`, one JSON record per trial event, appended, flushed and
//! fsynced before the sweep goes on, so a sweep killed at any moment loses at most the record
//! being written.
//!
//! Records, by `event`:
//! - `sweep`: the first line; the spec's identity ([`super::spec::SweepSpec::identity`]), which a
//!   resume must match.
//! - `created`: a trial starts, with its number and parameters. A trial run again after a kill
//!   gets a second `created`; the later one wins and drops the earlier attempt's reports.
//! - `report`: an intermediate validation loss (step, value).
//! - `finished`: the trial's state (COMPLETE, PRUNED or FAIL), objective, steps, seconds and,
//!   for a failure, the error.
//!
//! Replay keeps each trial once: a trial with a `finished` record is done; one with only
//! `created` was RUNNING when the sweep died and runs again. A last line without its newline is a
//! torn write: it is ignored and cut off before anything is appended, so the next record does
//! not fuse with it.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The journal's file name in the sweep folder.
pub const JOURNAL_FILE: &str = "journal.jsonl";

/// A trial's state, in Optuna's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TrialState {
    /// Created and not finished (or killed before it finished).
    Running,
    /// Trained to the end; its objective counts.
    Complete,
    /// Stopped early by the pruner; its value is the best validation loss it reported.
    Pruned,
    /// Ended with an error (a diverged run, a config the GPU refused); no value.
    Fail,
}

impl std::fmt::Display for TrialState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrialState::Running => "RUNNING",
            TrialState::Complete => "COMPLETE",
            TrialState::Pruned => "PRUNED",
            TrialState::Fail => "FAIL",
        })
    }
}

/// What the journal knows about one trial.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrialRecord {
    /// Trial number, from 0.
    pub number: usize,
    /// Parameter values as set in the config, by key.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// State.
    pub state: TrialState,
    /// The objective (COMPLETE) or the best reported value (PRUNED).
    pub value: Option<f64>,
    /// (steps done, validation loss) at each evaluation.
    pub reports: Vec<(u64, f64)>,
    /// Optimizer steps run.
    pub steps: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The error of a failed trial.
    pub error: Option<String>,
}

impl TrialRecord {
    /// A trial just created: running, nothing reported yet.
    pub fn running(number: usize, params: serde_json::Map<String, serde_json::Value>) -> Self {
        TrialRecord {
            number,
            params,
            state: TrialState::Running,
            value: None,
            reports: Vec::new(),
            steps: 0,
            seconds: 0.0,
            error: None,
        }
    }

    /// The lowest validation loss the trial reported.
    pub fn best_reported(&self) -> Option<f64> {
        self.reports.iter().map(|r| r.1).reduce(f64::min)
    }

    /// Finished (complete, pruned or failed).
    pub fn is_finished(&self) -> bool {
        self.state != TrialState::Running
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Record {
    Sweep {
        identity: serde_json::Value,
    },
    Created {
        trial: usize,
        params: serde_json::Map<String, serde_json::Value>,
    },
    Report {
        trial: usize,
        step: u64,
        value: f64,
    },
    Finished {
        trial: usize,
        state: TrialState,
        value: Option<f64>,
        steps: u64,
        seconds: f64,
        #[serde(default)]
        error: Option<String>,
    },
}

/// The journal, open for appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Journal {
    /// Starts a new journal in `dir` with the spec's identity as its first record.
    pub fn create(dir: &Path, identity: serde_json::Value) -> Result<Journal> {
        let path = dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let mut j = Journal { path, file };
        j.append(&Record::Sweep { identity })?;
        Ok(j)
    }

    /// Opens the journal in `dir` for a resume: returns it (torn tail removed), the identity it
    /// was started with, and the trials by number.
    pub fn resume(dir: &Path) -> Result<(Journal, serde_json::Value, Vec<TrialRecord>)> {
        let path = dir.join(JOURNAL_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let (identity, trials, complete_len) = replay(&text).map_err(|m| Error::Data {
            message: format!("{}: {m}", path.display()),
        })?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        if complete_len < text.len() {
            log::warn!(
                "{}: ignoring a torn last record ({} bytes)",
                path.display(),
                text.len() - complete_len
            );
            file.set_len(complete_len as u64)
                .and_then(|_| file.sync_all())
                .map_err(|e| io(&path, e))?;
        }
        Ok((Journal { path, file }, identity, trials))
    }

    fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| Error::Data {
            message: format!("{}: cannot encode a record: {e}", self.path.display()),
        })?;
        line.push('\n');
        // One write call per record, then fsync: a kill leaves whole records and at most one
        // torn last line.
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io(&self.path, e))
    }

    /// Records that a trial starts with these parameters.
    pub fn created(
        &mut self,
        trial: usize,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        self.append(&Record::Created {
            trial,
            params: params.clone(),
        })
    }

    /// Records an intermediate validation loss.
    pub fn report(&mut self, trial: usize, step: u64, value: f64) -> Result<()> {
        self.append(&Record::Report { trial, step, value })
    }

    /// Records how a trial ended.
    pub fn finished(&mut self, t: &TrialRecord) -> Result<()> {
        self.append(&Record::Finished {
            trial: t.number,
            state: t.state,
            value: t.value,
            steps: t.steps,
            seconds: t.seconds,
            error: t.error.clone(),
        })
    }
}

/// Replays journal text: the identity, the trials (index = number) and the length of the text
/// up to the end of the last whole line.
pub fn replay(
    text: &str,
) -> std::result::Result<(serde_json::Value, Vec<TrialRecord>, usize), String> {
    let complete_len = text.rfind('\n').map_or(0, |i| i + 1);
    let mut identity = None;
    let mut trials: Vec<TrialRecord> = Vec::new();
    for (n, line) in text[..complete_len].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line).map_err(|e| {
            format!(
                "line {} is not a journal record ({e}); the journal was edited or damaged: \
                 remove that line, or start the sweep again in another --out",
                n + 1
            )
        })?;
        let missing = |i: usize| format!("line {}: trial {i} was never created", n + 1);
        match record {
            Record::Sweep { identity: id } => identity = Some(id),
            Record::Created { trial: i, params } => {
                if i > trials.len() {
                    return Err(format!(
                        "line {}: trial {i} created before trial {}",
                        n + 1,
                        trials.len()
                    ));
                }
                let fresh = TrialRecord::running(i, params);
                if i == trials.len() {
                    trials.push(fresh);
                } else if trials[i].is_finished() {
                    return Err(format!(
                        "line {}: trial {i} created after it finished",
                        n + 1
                    ));
                } else {
                    trials[i] = fresh;
                }
            }
            Record::Report {
                trial: i,
                step,
                value,
            } => {
                let t = trials.get_mut(i).ok_or_else(|| missing(i))?;
                t.reports.push((step, value));
            }
            Record::Finished {
                trial: i,
                state,
                value,
                steps,
                seconds,
                error,
            } => {
                let t = trials.get_mut(i).ok_or_else(|| missing(i))?;
                if t.is_finished() {
                    return Err(format!("line {}: trial {i} finished twice", n + 1));
                }
                t.state = state;
                t.value = value;
                t.steps = steps;
                t.seconds = seconds;
                t.error = error;
            }
        }
    }
    let identity =
        identity.ok_or("it has no sweep record (an empty or damaged journal); start the sweep again in another --out")?;
    Ok((identity, trials, complete_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = r#"{"event":"sweep","identity":{"seed":1}}"#;

    #[test]
    fn replay_keeps_finished_trials_reruns_running_ones_and_drops_a_torn_tail() {
        let text = [
            HEAD,
            r#"{"event":"created","trial":0,"params":{"train.lr":0.001}}"#,
            r#"{"event":"report","trial":0,"step":5,"value":3.0}"#,
            r#"{"event":"finished","trial":0,"state":"COMPLETE","value":3.0,"steps":5,"seconds":1.0}"#,
            r#"{"event":"created","trial":1,"params":{"train.lr":0.002}}"#,
            r#"{"event":"report","trial":1,"step":5,"value":9.0}"#,
            // Trial 1 again after a kill: the first attempt's report goes.
            r#"{"event":"created","trial":1,"params":{"train.lr":0.002}}"#,
            r#"{"event":"report","trial":1,"step":5,"value":2.5}"#,
        ]
        .join("\n")
            + "\n"
            + r#"{"event":"finished","trial":1,"sta"#;
        let (identity, trials, len) = replay(&text).unwrap();
        assert_eq!(identity["seed"], 1);
        assert_eq!(len, text.rfind('\n').unwrap() + 1, "the torn line is cut");
        assert_eq!(trials.len(), 2);
        assert_eq!(trials[0].state, TrialState::Complete);
        assert_eq!(trials[0].value, Some(3.0));
        assert_eq!(trials[1].state, TrialState::Running);
        assert_eq!(trials[1].reports, vec![(5, 2.5)]);
    }

    #[test]
    fn replay_refuses_damage_before_the_last_line() {
        let text = format!("{HEAD}\nnot json\n");
        assert!(replay(&text).unwrap_err().contains("line 2"));
        let twice = format!(
            "{HEAD}\n{}\n{}\n{}\n",
            r#"{"event":"created","trial":0,"params":{}}"#,
            r#"{"event":"finished","trial":0,"state":"FAIL","value":null,"steps":0,"seconds":0.0}"#,
            r#"{"event":"finished","trial":0,"state":"FAIL","value":null,"steps":0,"seconds":0.0}"#
        );
        assert!(replay(&twice).unwrap_err().contains("finished twice"));
        assert!(replay("").unwrap_err().contains("no sweep record"));
    }
}
