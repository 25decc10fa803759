//! Paired comparisons on the same images: two models (per dataset and prompt id) or two
//! prompt ids (per model and dataset). Per image, a list-valued prompt's members are
//! averaged first; images scored on one side only are left out.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use serde::Serialize;
use vlsm::stats::Paired;

use super::{Options, Report, Row, metric, per_image};

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What is compared: `a − b`.
    pub a: String,
    pub b: String,
    /// The model (prompt comparisons) or the prompt id (model comparisons).
    pub within: String,
    pub dataset: String,
    /// Mean Dice of each side over the images both scored.
    pub a_dice: f64,
    pub b_dice: f64,
    /// Dice differences over the images both sides scored.
    pub dice: Paired,
}

/// `A,B` as two different names.
pub fn pair(s: &str, flag: &str) -> Result<[String; 2]> {
    match s.split(',').map(str::trim).collect::<Vec<_>>()[..] {
        [a, b] if !a.is_empty() && !b.is_empty() && a != b => Ok([a.into(), b.into()]),
        _ => bail!("{flag} {s}: expected two different names, A,B"),
    }
}

/// The Dice of each image of one side: rows of `model` and `prompt` on `dataset`, at the
/// model's table threshold.
fn side(
    rows: &[Row],
    report: &Report,
    options: Options,
    (model, dataset, prompt): (&str, &str, &str),
) -> std::collections::BTreeMap<(String, Option<usize>), f64> {
    let threshold = report
        .table_thresholds
        .iter()
        .find(|(m, _)| m == model)
        .map(|(_, t)| *t);
    let cell: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.error.is_empty()
                && r.model == model
                && r.dataset == dataset
                && r.prompt_id == prompt
                && Some(r.threshold) == threshold
        })
        .collect();
    per_image(&cell, |r| metric(r, options)[0])
}

/// Cell `a` (model, dataset, prompt id) against cell `b` over the images both scored,
/// labelled `(a, b, within)`; `None` when they share no image.
fn compare(
    (rows, report, options): (&[Row], &Report, Options),
    a: (&str, &str, &str),
    b: (&str, &str, &str),
    (a_name, b_name, within): (&str, &str, &str),
) -> Option<Comparison> {
    let right = side(rows, report, options, b);
    let (x, y): (Vec<f64>, Vec<f64>) = side(rows, report, options, a)
        .into_iter()
        .filter_map(|(k, v)| right.get(&k).map(|w| (v, *w)))
        .filter(|(v, w)| !v.is_nan() && !w.is_nan())
        .unzip();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (!x.is_empty()).then(|| Comparison {
        a: a_name.into(),
        b: b_name.into(),
        within: within.into(),
        dataset: a.1.into(),
        a_dice: mean(&x),
        b_dice: mean(&y),
        dice: Paired::of(&x, &y),
    })
}

/// Model `a` against model `b`, per dataset and prompt id.
pub fn models(
    rows: &[Row],
    report: &Report,
    options: Options,
    a: &str,
    b: &str,
) -> Vec<Comparison> {
    let data = (rows, report, options);
    let mut out = Vec::new();
    for dataset in &report.datasets {
        for prompt in &report.prompts {
            let (x, y) = ((a, &**dataset, &**prompt), (b, &**dataset, &**prompt));
            out.extend(compare(data, x, y, (a, b, prompt)));
        }
    }
    out
}

/// Prompt id `p` against `q`, per model and dataset.
pub fn prompts(
    rows: &[Row],
    report: &Report,
    options: Options,
    p: &str,
    q: &str,
) -> Vec<Comparison> {
    let data = (rows, report, options);
    let mut out = Vec::new();
    for model in &report.models {
        for dataset in &report.datasets {
            let (x, y) = ((&**model, &**dataset, p), (&**model, &**dataset, q));
            out.extend(compare(data, x, y, (p, q, model)));
        }
    }
    out
}

/// Every control prompt (`ctl-…`, `vlsm bench --prompt-controls`) against the entry's own
/// prompt ([`vlsm::prompts::CONTROL_REFERENCE`]), per model and dataset.
pub fn controls(rows: &[Row], report: &Report, options: Options) -> Vec<Comparison> {
    let reference = vlsm::prompts::CONTROL_REFERENCE;
    let mut ids: Vec<&str> = Vec::new();
    for r in rows {
        if r.prompt_id.starts_with("ctl-") && !ids.contains(&r.prompt_id.as_str()) {
            ids.push(&r.prompt_id);
        }
    }
    let mut out = Vec::new();
    for model in &report.models {
        for dataset in &report.datasets {
            for &id in &ids {
                let (x, y) = (
                    (&**model, &**dataset, id),
                    (&**model, &**dataset, reference),
                );
                out.extend(compare(
                    (rows, report, options),
                    x,
                    y,
                    (id, reference, model),
                ));
            }
        }
    }
    out
}

pub fn controls_markdown(report: &Report, md: &mut String) {
    if report.controls.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Prompt controls\n\nEach control prompt against the entry's own {} on the same images: Dice (%) of both, the difference in percentage points with its bootstrap 95 % interval, and the Wilcoxon signed-rank p-value. A model that reads the prompt loses Dice with the empty, nonsense and wrong-class controls; one that does not scores them like its own prompt. Templates: `ctl-empty` \"\", `ctl-nonsense` \"blicket\", `ctl-wrong-class` a healthy look-alike (\"a healthy colon\" for polyps), `ctl-wrong-location` p6 with its location mirrored, `ctl-class-alone` p1, `ctl-over-described` the entry's longest prompt.\n",
        vlsm::prompts::CONTROL_REFERENCE
    );
    let _ = writeln!(
        md,
        "| model | dataset | control | images | control Dice % | {} Dice % | difference (pp) | 95% CI | p |",
        vlsm::prompts::CONTROL_REFERENCE
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for c in &report.controls {
        let d = &c.dice;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:+.2} | [{:+.2}, {:+.2}] | {} |",
            c.within,
            c.dataset,
            c.a,
            d.n,
            c.a_dice * 100.0,
            c.b_dice * 100.0,
            d.mean_difference * 100.0,
            d.ci_low * 100.0,
            d.ci_high * 100.0,
            p_value(d.p_value),
        );
    }
}

pub fn markdown(report: &Report, md: &mut String) {
    if report.comparisons.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Paired comparisons\n\nDice difference (A − B, percentage points) over the images both scored: mean, percentile bootstrap 95 % interval (images resampled, 2000 times, seed 42) and the two-sided Wilcoxon signed-rank p-value (SciPy's `wilcoxon` defaults). An interval that excludes 0 says the difference is more than noise between images; the p-values are not corrected for the number of comparisons.\n"
    );
    let _ = writeln!(
        md,
        "| A | B | model / prompt | dataset | images | A − B (pp) | 95% CI | p |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for c in &report.comparisons {
        let d = &c.dice;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:+.2} | [{:+.2}, {:+.2}] | {} |",
            c.a,
            c.b,
            c.within,
            c.dataset,
            d.n,
            d.mean_difference * 100.0,
            d.ci_low * 100.0,
            d.ci_high * 100.0,
            p_value(d.p_value),
        );
    }
}

fn p_value(p: f64) -> String {
    if p.is_nan() {
        "–".into()
    } else if p < 0.001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}
