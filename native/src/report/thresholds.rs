//! The threshold study: Dice vs threshold per model and dataset (from `vlsm bench
//! --thresholds`), and each model and dataset's best threshold chosen on validation results
//! (`--tune-on`), never on the data it is reported on.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Result, bail};
use serde::Serialize;

use super::{Options, Report, Row, mean_of, metric, per_image};

/// Mean Dice over a model's prompt ids on one dataset, at each threshold it was scored at.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub model: String,
    pub dataset: String,
    pub thresholds: Vec<f32>,
    /// For each threshold: the mean over prompt ids of the mean Dice over images.
    pub dice: Vec<f64>,
    pub prompts: usize,
}

impl Curve {
    /// The threshold with the highest Dice (the lowest such threshold on a tie).
    fn best(&self) -> Option<(f32, f64)> {
        self.thresholds
            .iter()
            .zip(&self.dice)
            .filter(|(_, d)| !d.is_nan())
            .fold(None, |best, (&t, &d)| match best {
                Some((_, bd)) if bd >= d => best,
                _ => Some((t, d)),
            })
    }

    fn at(&self, threshold: f32) -> Option<f64> {
        self.thresholds
            .iter()
            .position(|&t| t == threshold)
            .map(|i| self.dice[i])
    }
}

/// A threshold chosen on validation results, and the Dice it gives here.
#[derive(Debug, Clone, Serialize)]
pub struct Tuned {
    pub model: String,
    pub dataset: String,
    pub chosen: f32,
    pub val_dice: f64,
    /// The tables' threshold and the Dice there (these results).
    pub table_threshold: f32,
    pub dice_at_table_threshold: Option<f64>,
    /// The Dice at the chosen threshold (these results); `None` when it was not scored.
    pub dice_at_chosen: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Study {
    /// The splits of the rows the curves come from.
    pub splits: Vec<String>,
    pub curves: Vec<Curve>,
    /// The validation results thresholds were chosen on (`--tune-on`).
    pub tuned_on: Option<String>,
    pub tuned: Vec<Tuned>,
}

/// Curves of every (model, dataset) scored at `least` thresholds or more.
fn curves(rows: &[Row], options: Options, least: usize) -> Vec<Curve> {
    // (model, dataset) → threshold bits → prompt id → rows.
    type Cells<'a> = BTreeMap<u32, BTreeMap<&'a str, Vec<&'a Row>>>;
    let mut groups: Vec<((&str, &str), Cells)> = Vec::new();
    for r in rows.iter().filter(|r| r.error.is_empty()) {
        let key = (r.model.as_str(), r.dataset.as_str());
        let index = match groups.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                groups.push((key, BTreeMap::new()));
                groups.len() - 1
            }
        };
        groups[index]
            .1
            .entry(r.threshold.to_bits())
            .or_default()
            .entry(&r.prompt_id)
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for ((model, dataset), by_threshold) in groups {
        if by_threshold.len() < least {
            continue;
        }
        let mut points: Vec<(f32, f64, usize)> = by_threshold
            .into_iter()
            .map(|(bits, prompts)| {
                let n = prompts.len();
                let dice = mean_of(prompts.into_values().map(|cell| {
                    let images = per_image(&cell, |r| metric(r, options)[0]);
                    mean_of(images.into_values())
                }));
                (f32::from_bits(bits), dice, n)
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.push(Curve {
            model: model.to_string(),
            dataset: dataset.to_string(),
            thresholds: points.iter().map(|p| p.0).collect(),
            dice: points.iter().map(|p| p.1).collect(),
            prompts: points.iter().map(|p| p.2).max().unwrap_or(0),
        });
    }
    out
}

/// The study, when these results scored several thresholds or `tuning` (the validation
/// results' path and rows) is given.
pub fn study(
    rows: &[Row],
    tuning: Option<(&str, &[Row])>,
    report: &Report,
    options: Options,
) -> Result<Option<Study>> {
    let scored = curves(rows, options, 2);
    let mut splits: Vec<String> = rows.iter().map(|r| r.split.clone()).collect();
    splits.sort();
    splits.dedup();
    let mut tuned = Vec::new();
    if let Some((path, val_rows)) = tuning {
        if val_rows.iter().any(|r| r.split == "test") {
            bail!(
                "--tune-on {path}: these are test-split results; thresholds must be chosen on validation results (vlsm bench --split val --thresholds …)"
            );
        }
        let val_curves = curves(val_rows, options, 2);
        if val_curves.is_empty() {
            bail!(
                "--tune-on {path}: no model was scored at more than one threshold there (vlsm bench --split val --thresholds …)"
            );
        }
        // Here, pairs scored at a single threshold count too (a one-point curve).
        let here = curves(rows, options, 1);
        for val in &val_curves {
            let Some((chosen, val_dice)) = val.best() else {
                continue;
            };
            let Some(table_threshold) = report
                .table_thresholds
                .iter()
                .find(|(m, _)| *m == val.model)
                .map(|(_, t)| *t)
            else {
                continue; // a model these results do not have
            };
            let curve = here
                .iter()
                .find(|c| c.model == val.model && c.dataset == val.dataset);
            tuned.push(Tuned {
                model: val.model.clone(),
                dataset: val.dataset.clone(),
                chosen,
                val_dice,
                table_threshold,
                dice_at_table_threshold: curve.and_then(|c| c.at(table_threshold)),
                dice_at_chosen: curve.and_then(|c| c.at(chosen)),
            });
        }
    }
    if scored.is_empty() && tuned.is_empty() {
        return Ok(None);
    }
    Ok(Some(Study {
        splits,
        curves: scored,
        tuned_on: tuning.map(|(p, _)| p.to_string()),
        tuned,
    }))
}

fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) if !v.is_nan() => format!("{:.2}", v * 100.0),
        _ => "–".into(),
    }
}

pub fn markdown(report: &Report, md: &mut String) {
    let Some(study) = &report.threshold_study else {
        return;
    };
    if !study.curves.is_empty() {
        let mut thresholds: Vec<f32> = study
            .curves
            .iter()
            .flat_map(|c| c.thresholds.iter().copied())
            .collect();
        thresholds.sort_by(f32::total_cmp);
        thresholds.dedup();
        let _ = writeln!(
            md,
            "\n## Dice (%) vs threshold\n\nMean over prompt ids of the mean Dice over images ({} split). The highest value of each row is in bold; it is chosen on the data it is measured on, so it is optimistic: choose a threshold on validation results (`--tune-on`).\n",
            study.splits.join(", ")
        );
        let header: Vec<String> = thresholds.iter().map(|t| t.to_string()).collect();
        let _ = writeln!(md, "| model | dataset | {} |", header.join(" | "));
        let _ = writeln!(md, "|---|---|{}", "---|".repeat(thresholds.len()));
        for c in &study.curves {
            let best = c.best().map(|b| b.0);
            let cells: Vec<String> = thresholds
                .iter()
                .map(|&t| match c.at(t) {
                    Some(d) if Some(t) == best => format!("**{}**", pct(Some(d))),
                    d => pct(d),
                })
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                c.model,
                c.dataset,
                cells.join(" | ")
            );
        }
    }
    if let Some(val) = &study.tuned_on {
        let _ = writeln!(
            md,
            "\n## Thresholds chosen on validation results\n\nEach model and dataset's threshold with the highest mean Dice in `{val}`, and the Dice it gives here ({} split).\n",
            study.splits.join(", ")
        );
        let _ = writeln!(
            md,
            "| model | dataset | chosen | val Dice % | Dice % here, chosen | tables' threshold | Dice % here, tables' |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for t in &study.tuned {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                t.model,
                t.dataset,
                t.chosen,
                pct(Some(t.val_dice)),
                match t.dice_at_chosen {
                    Some(d) => pct(Some(d)),
                    None => "not scored (bench with the same --thresholds)".into(),
                },
                t.table_threshold,
                pct(t.dice_at_table_threshold),
            );
        }
    }
}
