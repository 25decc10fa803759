//! Empty masks under both conventions: medvlsm's (an empty prediction on an empty mask
//! scores 1) and nnU-Net's / Metrics Reloaded's (undefined, left out of means), and
//! nnU-Net-style `summary.json` files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;
use serde_json::{Value, json};
use vlsm::stats::Summary;

use super::{EmptyMasks, Options, Report, Resolution, Row, metric, per_image};

/// Nothing predicted and nothing there (pixel counts at the original resolution).
pub fn both_empty(row: &Row) -> bool {
    matches!((row.tp, row.fp, row.fn_), (Some(0), Some(0), Some(0)))
}

fn truth_empty(row: &Row) -> bool {
    matches!((row.tp, row.fn_), (Some(0), Some(0)))
}

/// A (model, dataset, prompt id) whose Dice depends on the convention.
#[derive(Debug, Clone, Serialize)]
pub struct EmptyCell {
    pub model: String,
    pub dataset: String,
    pub prompt_id: String,
    /// Images scored, and those whose mask is empty.
    pub images: usize,
    pub empty_masks: usize,
    /// Rows (prompt members included) with an empty prediction on an empty mask.
    pub both_empty: usize,
    pub dice_medvlsm: Summary,
    pub dice_nnunet: Summary,
}

/// Every table cell (at each model's table threshold, original resolution) with at least
/// one empty prediction on an empty mask.
pub fn cells(
    rows: &[Row],
    table_thresholds: &[(String, f32)],
    datasets: &[String],
) -> Vec<EmptyCell> {
    let mut prompts: Vec<&str> = Vec::new();
    for r in rows {
        if !prompts.contains(&r.prompt_id.as_str()) {
            prompts.push(&r.prompt_id);
        }
    }
    prompts.sort_by_key(|p| (vlsm::dataset::prompt_number(p), p.to_string()));
    let mut out = Vec::new();
    for (model, threshold) in table_thresholds {
        for dataset in datasets {
            for &prompt in &prompts {
                let cell: Vec<&Row> = rows
                    .iter()
                    .filter(|r| {
                        r.error.is_empty()
                            && &r.model == model
                            && &r.dataset == dataset
                            && r.prompt_id == prompt
                            && r.threshold == *threshold
                    })
                    .collect();
                let both = cell.iter().filter(|r| both_empty(r)).count();
                if both == 0 {
                    continue;
                }
                let dice = |empty_masks| {
                    let options = Options {
                        resolution: Resolution::Original,
                        empty_masks,
                    };
                    let images = per_image(&cell, |r| metric(r, options)[0]);
                    Summary::of(&images.into_values().collect::<Vec<_>>())
                };
                let images = per_image(&cell, |r| Some(f64::from(u8::from(truth_empty(r)))));
                out.push(EmptyCell {
                    model: model.clone(),
                    dataset: dataset.clone(),
                    prompt_id: prompt.to_string(),
                    images: images.len(),
                    empty_masks: images.values().filter(|&&v| v > 0.0).count(),
                    both_empty: both,
                    dice_medvlsm: dice(EmptyMasks::Medvlsm),
                    dice_nnunet: dice(EmptyMasks::Nnunet),
                });
            }
        }
    }
    out
}

pub fn markdown(report: &Report, md: &mut String) {
    if report.empty_masks_differ.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Empty masks: medvlsm's convention vs nnU-Net's\n\nAn empty prediction on an empty mask scores Dice 1 in medvlsm (MONAI, `ignore_empty=False`) and is undefined, left out of the mean, in nnU-Net and Metrics Reloaded. Cells where that changes the Dice (original resolution; tables above: {}):\n",
        match report.empty_masks {
            EmptyMasks::Medvlsm => "medvlsm's",
            EmptyMasks::Nnunet => "nnU-Net's",
        }
    );
    let _ = writeln!(
        md,
        "| model | dataset | prompt | images | empty masks | empty on empty (rows) | Dice % medvlsm | Dice % nnU-Net (images) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for c in &report.empty_masks_differ {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) |",
            c.model,
            c.dataset,
            c.prompt_id,
            c.images,
            c.empty_masks,
            c.both_empty,
            super::percent(&c.dice_medvlsm),
            super::percent(&c.dice_nnunet),
            c.dice_nnunet.n,
        );
    }
}

/// nnU-Net's per-case metrics of a row (`evaluate_predictions.py`'s keys; Dice and IoU
/// NaN when both masks are empty).
fn case_metrics(r: &Row) -> Value {
    let (tp, fp, fn_, tn) = (
        r.tp.unwrap_or(0),
        r.fp.unwrap_or(0),
        r.fn_.unwrap_or(0),
        r.tn.unwrap_or(0),
    );
    let (dice, iou) = if tp + fp + fn_ == 0 {
        (f64::NAN, f64::NAN)
    } else {
        (
            2.0 * tp as f64 / (2 * tp + fp + fn_) as f64,
            tp as f64 / (tp + fp + fn_) as f64,
        )
    };
    json!({
        "Dice": number(dice),
        "FN": fn_,
        "FP": fp,
        "IoU": number(iou),
        "TN": tn,
        "TP": tp,
        "n_pred": tp + fp,
        "n_ref": tp + fn_,
    })
}

/// Stands for NaN until the text is written: nnU-Net writes (and reads) a bare `NaN`,
/// which JSON values cannot hold.
const NAN: &str = "__vlsm_NaN__";

fn number(v: f64) -> Value {
    if v.is_nan() { json!(NAN) } else { json!(v) }
}

/// NaN-skipping means of every metric over the cases (numpy's `nanmean`, as nnU-Net).
fn means(cases: &[Value]) -> Value {
    let keys = ["Dice", "FN", "FP", "IoU", "TN", "TP", "n_pred", "n_ref"];
    let mut out = serde_json::Map::new();
    for key in keys {
        let values: Vec<f64> = cases
            .iter()
            .filter_map(|c| c["metrics"]["1"][key].as_f64())
            .collect();
        let mean = if values.is_empty() {
            f64::NAN
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        };
        out.insert(key.to_string(), number(mean));
    }
    Value::Object(out)
}

/// Writes OUT/nnunet/<model>/<dataset>/<prompt id>/summary.json for every table cell, in
/// nnU-Net v2's layout (label 1 the foreground; a list-valued prompt's members are cases
/// of their own); returns the paths.
pub fn nnunet_summaries(rows: &[Row], report: &Report, out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for c in &report.cells {
        let threshold = report
            .table_thresholds
            .iter()
            .find(|(m, _)| *m == c.model)
            .map(|(_, t)| *t);
        let mut cell: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.error.is_empty()
                    && r.model == c.model
                    && r.dataset == c.dataset
                    && r.prompt_id == c.prompt_id
                    && Some(r.threshold) == threshold
            })
            .collect();
        cell.sort_by_key(|r| (r.split.clone(), r.entry, r.member));
        let cases: Vec<Value> = cell
            .iter()
            .map(|r| {
                json!({
                    "metrics": { "1": case_metrics(r) },
                    "prediction_file": format!("{}/{}/{}[{}]/{}", r.model, r.dataset, r.prompt_id, r.member, r.image),
                    "reference_file": format!("{}/{}", r.dataset, r.mask),
                })
            })
            .collect();
        let mean = means(&cases);
        let summary = json!({
            "foreground_mean": mean.clone(),
            "mean": { "1": mean },
            "metric_per_case": cases,
        });
        let text = serde_json::to_string_pretty(&summary)?.replace(&format!("\"{NAN}\""), "NaN");
        let dir = out
            .join("nnunet")
            .join(safe(&c.model))
            .join(safe(&c.dataset))
            .join(safe(&c.prompt_id));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("summary.json");
        crate::segment::write_atomic(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// A name as one path component: anything but letters, digits, `.`, `-` and `_` becomes `_`
/// (and a name of dots a `_`), so no name can leave OUT/nnunet.
fn safe(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "_".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_one_component() {
        assert_eq!(safe("../x/y"), ".._x_y");
        assert_eq!(safe(".."), "_");
        assert_eq!(safe(""), "_");
        assert_eq!(safe("CIDAS/clipseg rd64"), "CIDAS_clipseg_rd64");
    }
}
