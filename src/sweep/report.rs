//! A sweep's results: the table of trials (also `results.txt`), `sweep.json`, `best.toml` and
//! `sweep.png` (the objective against each parameter). Rewritten after every trial, so a sweep
//! that is stopped still shows what it found.

use super::journal::{TrialRecord, TrialState};
use super::spec::{ParamKind, SweepSpec};
use super::{SweepSummary, trial_config};
use crate::data::write_atomic;
use crate::train::plot::{FONT_NAME, register_font};
use crate::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// Results table file name.
pub const RESULTS_FILE: &str = "results.txt";
/// Summary file name.
pub const SUMMARY_FILE: &str = "sweep.json";
/// Best config file name.
pub const BEST_FILE: &str = "best.toml";
/// Plot file name.
pub const PLOT_FILE: &str = "sweep.png";

/// Trials in the table's order: COMPLETE by objective, then PRUNED by the best loss they
/// reported, then FAIL and RUNNING by number.
pub fn ranked(trials: &[TrialRecord]) -> Vec<&TrialRecord> {
    let rank = |s: TrialState| match s {
        TrialState::Complete => 0,
        TrialState::Pruned => 1,
        TrialState::Fail => 2,
        TrialState::Running => 3,
    };
    let mut v: Vec<&TrialRecord> = trials.iter().collect();
    v.sort_by(|a, b| {
        rank(a.state)
            .cmp(&rank(b.state))
            .then(
                a.value
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.value.unwrap_or(f64::INFINITY)),
            )
            .then(a.number.cmp(&b.number))
    });
    v
}

/// The table: one row per trial (rank order), with each parameter in a column.
pub fn table(spec: &SweepSpec, trials: &[TrialRecord]) -> String {
    let mut header: Vec<String> = [
        "trial",
        "state",
        "objective",
        "best val",
        "steps",
        "seconds",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(spec.params.iter().map(|p| p.key.clone()));
    let mut rows = vec![header];
    for t in ranked(trials) {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        let objective = match t.state {
            TrialState::Complete => f(t.value),
            _ => "-".into(),
        };
        let mut row = vec![
            t.number.to_string(),
            t.state.to_string(),
            objective,
            f(t.best_reported()),
            t.steps.to_string(),
            format!("{:.0}", t.seconds),
        ];
        row.extend(spec.params.iter().map(|p| {
            t.params
                .get(&p.key)
                .map_or("-".into(), |v| v.to_string().trim_matches('"').to_string())
        }));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Writes `results.txt`, `sweep.json`, `best.toml` (when a trial completed) and `sweep.png`.
pub fn write_files(spec: &SweepSpec, out: &Path, s: &SweepSummary) -> Result<()> {
    write_atomic(&out.join(RESULTS_FILE), table(spec, &s.trials).as_bytes())?;
    let json = serde_json::json!({
        "spec": spec,
        "best": s.best,
        "interrupted": s.interrupted,
        "steps_run": s.trials.iter().map(|t| t.steps).sum::<u64>(),
        "trials": s.trials,
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Data {
        message: format!("{SUMMARY_FILE}: {e}"),
    })?;
    write_atomic(&out.join(SUMMARY_FILE), text.as_bytes())?;
    if let Some(b) = s.best {
        let t = &s.trials[b];
        let config = trial_config(spec, t)?;
        let body = toml::to_string_pretty(&config).map_err(|e| Error::Config {
            message: e.to_string(),
        })?;
        let text = format!(
            "# The best trial ({b}) of the sweep in {}: {} = {:.4}, with {}.\n# Train it with: \
             kiln train --config {} --data FILE\n\n{body}",
            out.display(),
            spec.objective,
            t.value.unwrap_or(f64::NAN),
            super::overrides(t).join(", "),
            out.join(BEST_FILE).display()
        );
        write_atomic(&out.join(BEST_FILE), text.as_bytes())?;
    }
    // A picture that cannot be drawn is not worth failing the sweep for.
    if let Err(e) = plot(spec, &s.trials, &out.join(PLOT_FILE)) {
        log::warn!("could not draw {PLOT_FILE}: {e}");
    }
    Ok(())
}

/// Where a trial's parameter value goes on a panel's x axis.
type XOf = Box<dyn Fn(&serde_json::Value) -> Option<f64>>;

/// One panel per parameter: each finished trial's value (COMPLETE: objective, in blue; PRUNED:
/// the best loss it reported, in grey) against the parameter (log10 of it for a log range, the
/// index for a choice).
pub fn plot(spec: &SweepSpec, trials: &[TrialRecord], path: &Path) -> Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    };
    let n = spec.params.len().max(1);
    let cols = n.min(3);
    let rows = n.div_ceil(cols);
    let tmp = path.with_extension("tmp.png");
    {
        let root =
            BitMapBackend::new(&tmp, (420 * cols as u32, 340 * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let panels = root.split_evenly((rows, cols));
        let points: Vec<(&TrialRecord, f64)> = trials
            .iter()
            .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
            .filter_map(|t| t.value.filter(|v| v.is_finite()).map(|v| (t, v)))
            .collect();
        let (lo, hi) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
        let (lo, hi) = if lo.is_finite() {
            (lo, hi.max(lo + 1e-3))
        } else {
            (0.0, 1.0)
        };
        let pad = 0.05 * (hi - lo);
        for (p, area) in spec.params.iter().zip(panels.iter()) {
            let (x_of, x_desc, (x0, x1)): (XOf, _, _) = match &p.kind {
                ParamKind::Float { low, high, log, .. } if *log => (
                    Box::new(|v| v.as_f64().map(f64::log10)),
                    format!("log10({})", p.key),
                    (low.log10(), high.log10()),
                ),
                ParamKind::Float { low, high, .. } => {
                    (Box::new(|v| v.as_f64()), p.key.clone(), (*low, *high))
                }
                ParamKind::Int { low, high, log, .. } if *log => (
                    Box::new(|v| v.as_f64().map(f64::log10)),
                    format!("log10({})", p.key),
                    ((*low as f64).log10(), (*high as f64).log10()),
                ),
                ParamKind::Int { low, high, .. } => (
                    Box::new(|v| v.as_f64()),
                    p.key.clone(),
                    (*low as f64, *high as f64),
                ),
                ParamKind::Choice { values } => {
                    let json: Vec<serde_json::Value> =
                        values.iter().map(super::sampler::to_json).collect();
                    let labels: Vec<String> = values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| format!("{i}={v}"))
                        .collect();
                    (
                        Box::new(move |v| json.iter().position(|c| c == v).map(|i| i as f64)),
                        format!("{} ({})", p.key, labels.join(", ")),
                        (0.0, (values.len() - 1) as f64),
                    )
                }
            };
            let xpad = 0.05 * (x1 - x0).max(1e-9);
            let mut chart = ChartBuilder::on(area)
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (lo - pad)..(hi + pad))
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc("validation loss")
                .label_style((FONT_NAME, 12))
                .x_labels(match &p.kind {
                    // One tick per choice rather than fractional indices.
                    ParamKind::Choice { values } => values.len(),
                    _ => 6,
                })
                .draw()
                .map_err(|e| err(&e))?;
            for (state, color) in [
                (TrialState::Pruned, RGBColor(160, 160, 160)),
                (TrialState::Complete, RGBColor(30, 80, 200)),
            ] {
                let pts: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|(t, _)| t.state == state)
                    .filter_map(|(t, v)| Some((x_of(t.params.get(&p.key)?)?, *v)))
                    .collect();
                chart
                    .draw_series(pts.into_iter().map(|q| Circle::new(q, 4, color.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}
