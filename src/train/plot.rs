//! The loss-curve PNG of a run, drawn from its metrics.jsonl with plotters.
//!
//! The metrics file is the source of truth: it holds the whole run, including what came before a
//! resume (a step logged twice, once before a crash and once after the resume, is drawn once, with
//! its later value). The picture is written beside a temporary name and renamed into place, so a
//! viewer never sees half a file.

use crate::{Error, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

/// The font plotters draws text with, shipped with kiln (DejaVu Sans Mono, see
/// assets/DejaVu-LICENSE.txt) so that no system font is needed.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
pub(crate) const FONT_NAME: &str = "kiln-mono";

/// Makes [`FONT_NAME`] available to plotters (once per process).
pub(crate) fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The font is a constant that parses; if it ever did not, plotters draws no text.
        let _ = plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT);
    });
}

/// The training and validation losses recorded in a metrics file, by step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossHistory {
    /// (step, training loss of that step).
    pub train: Vec<(u64, f64)>,
    /// (steps completed, validation loss).
    pub val: Vec<(u64, f64)>,
}

impl LossHistory {
    /// Reads `train_loss` and `val_loss` records from JSON lines; other records and lines that do
    /// not parse (a line cut short by a crash) are passed over.
    pub fn from_jsonl(text: &str) -> LossHistory {
        let mut train = BTreeMap::new();
        let mut val = BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
                continue;
            };
            let get = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite());
            match (get("val_loss"), get("train_loss")) {
                (Some(l), _) => {
                    val.insert(step, l);
                }
                (None, Some(l)) => {
                    train.insert(step, l);
                }
                _ => {}
            }
        }
        LossHistory {
            train: train.into_iter().collect(),
            val: val.into_iter().collect(),
        }
    }
}

/// Draws `history` into a PNG at `path` (840×480): the per-step training loss, its moving average
/// over 50 steps, and the validation loss at each evaluation.
pub fn plot_losses(path: &Path, history: &LossHistory, title: &str) -> Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    let err = |e: &dyn std::fmt::Display| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    };
    {
        let root = BitMapBackend::new(&tmp, (840, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let all = history.train.iter().chain(&history.val);
        let x_max = all.clone().map(|p| p.0).max().unwrap_or(1).max(1);
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
        let (lo, hi) = if lo.is_finite() {
            (lo, hi.max(lo + 1e-3))
        } else {
            (0.0, 1.0)
        };
        let pad = 0.05 * (hi - lo);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT_NAME, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0u64..x_max, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .label_style((FONT_NAME, 13))
            .draw()
            .map_err(|e| err(&e))?;
        let light = RGBColor(150, 180, 230);
        chart
            .draw_series(LineSeries::new(history.train.iter().copied(), light))
            .map_err(|e| err(&e))?
            .label("train loss")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], light));
        let window = 50;
        let smooth: Vec<(u64, f64)> = history
            .train
            .iter()
            .enumerate()
            .map(|(i, &(s, _))| {
                let from = i.saturating_sub(window - 1);
                let w = &history.train[from..=i];
                (s, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("train loss, mean of 50 steps")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                history.val.iter().copied(),
                RED.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED.stroke_width(2)));
        chart
            .draw_series(history.val.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| err(&e))?;
        chart
            .configure_series_labels()
            .label_font((FONT_NAME, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Redraws `out_dir`/loss.png from `out_dir`/metrics.jsonl.
pub fn plot_run(out_dir: &Path, title: &str) -> Result<()> {
    let metrics = out_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).map_err(|source| Error::Io {
        path: metrics.display().to_string(),
        source,
    })?;
    plot_losses(
        &out_dir.join("loss.png"),
        &LossHistory::from_jsonl(&text),
        title,
    )
}

/// Draws the ops of `profile` by kind as horizontal bars of milliseconds into a PNG at `path`
/// (840 × 60 + 28 per kind), each bar labelled with its op count, dispatches and rate.
pub fn plot_profile(path: &Path, profile: &crate::model::profile::StepProfile) -> Result<()> {
    register_font();
    let rows = profile.by_kind();
    let tmp = path.with_extension("tmp.png");
    let err = |e: &dyn std::fmt::Display| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    };
    {
        let height = 90 + 28 * rows.len() as u32;
        let root = BitMapBackend::new(&tmp, (840, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let max_ms = rows.iter().map(|r| r.seconds * 1e3).fold(0.0, f64::max);
        let title = format!(
            "{}: {:.1} ms/step, {} dispatches",
            profile.model,
            profile.step_s * 1e3,
            profile.dispatches
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT_NAME, 15))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(10)
            .build_cartesian_2d(0.0..(max_ms * 1.9).max(1e-3), 0.0..rows.len() as f64)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc(match profile.timing {
                crate::model::profile::OpTiming::Timestamps => "ms (GPU timestamps, in the step)",
                crate::model::profile::OpTiming::Submissions => "ms (each op submitted alone)",
            })
            .label_style((FONT_NAME, 12))
            .draw()
            .map_err(|e| err(&e))?;
        let n = rows.len() as f64;
        let colour = RGBColor(70, 110, 190);
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let y = n - 1.0 - i as f64;
                Rectangle::new(
                    [(0.0, y + 0.15), (r.seconds * 1e3, y + 0.85)],
                    colour.filled(),
                )
            }))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let y = n - 1.0 - i as f64;
                let rate = match r.gflops {
                    Some(g) => format!("{g:.1} GFLOP/s"),
                    None => format!("{:.1} GB/s", r.gbps),
                };
                Text::new(
                    format!(
                        "{} ×{} ({} disp.) {:.2} ms, {:.0}%, {rate}",
                        r.name.rsplit("::").next().unwrap_or(r.name),
                        r.ops,
                        r.census.dispatches,
                        r.seconds * 1e3,
                        100.0 * r.share
                    ),
                    (r.seconds * 1e3 + max_ms * 0.02, y + 0.75),
                    (FONT_NAME, 12),
                )
            }))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}
