//! `vlsm report RESULTS`: the study's tables (markdown and JSON) and Dice-vs-prompt plots
//! (PNG and SVG, like the study's Figure 2) from a `vlsm bench` results file.
//!
//! Per image (entry), a list-valued prompt's members are averaged first; then mean, sample
//! std and a bootstrap 95 % interval are taken over images. Rows with errors are left out
//! and counted. HD95/NSD means skip NaN values (empty masks) and say how many.
//!
//! Beside the tables: both empty-mask conventions where they differ (and nnU-Net-style
//! `summary.json` files), a threshold study when the run scored several thresholds, and
//! paired comparisons of two models or two prompts.

mod compare;
mod empty;
pub mod thresholds;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use vlsm::dataset::prompt_number;
use vlsm::stats::Summary;

use crate::bench::results::{self, RESULTS, Row, RunConfig};
use crate::plot;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// Predictions resized back to each image's size (nearest), against the original mask.
    Original,
    /// At the model's input size, against the mask resized there (medvlsm's logged metrics).
    Model,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// A results.csv, or the `vlsm bench --out` folder holding it.
    results: PathBuf,
    /// Where to write report.md, report.json and the plots (default: beside results.csv).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The prompt id of the models × datasets table (default: one table per prompt id).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, value_enum, default_value = "original")]
    resolution: Resolution,
    /// How an empty prediction on an empty mask scores in the tables: 1 (medvlsm: MONAI's
    /// ignore_empty=False) or NaN, left out of means (nnU-Net, Metrics Reloaded). The
    /// report lists both wherever they differ.
    #[arg(long, value_enum, default_value = "medvlsm")]
    empty_masks: EmptyMasks,
    /// Also write nnU-Net-style `summary.json` files (one per model, dataset and prompt id)
    /// under OUT/nnunet/, with the pixel counts of every case.
    #[arg(long)]
    nnunet_summary: bool,
    /// The same models' `vlsm bench --split val --thresholds …` results: each model and
    /// dataset's best threshold is chosen there (never on the test data) and reported at
    /// that threshold on these results.
    #[arg(long, value_name = "VAL_RESULTS")]
    tune_on: Option<PathBuf>,
    /// Compare two models, `A,B` (their names in the `model` column), on the same images:
    /// the mean Dice difference per dataset and prompt with a paired bootstrap 95 %
    /// interval and a Wilcoxon signed-rank p-value.
    #[arg(long, value_name = "A,B")]
    compare: Option<String>,
    /// Compare two prompt ids, `P,Q` (e.g. p0,p3), of every model the same way.
    #[arg(long, value_name = "P,Q")]
    compare_prompts: Option<String>,
}

/// How a pair of empty masks (nothing predicted, nothing there) scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyMasks {
    /// Dice and IoU 1 (medvlsm, MONAI's `ignore_empty=False`).
    Medvlsm,
    /// Dice and IoU undefined (NaN), left out of means (nnU-Net, Metrics Reloaded).
    Nnunet,
}

/// Summaries of one (model, dataset, prompt id).
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub model: String,
    pub dataset: String,
    pub prompt_id: String,
    /// Images (entries) scored.
    pub images: usize,
    pub dice: Summary,
    pub iou: Summary,
    pub hd95: Summary,
    pub nsd: Summary,
    /// For list-valued prompts: each member's Dice over the images that have it.
    pub members: Vec<MemberCell>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberCell {
    pub member: usize,
    /// The member's text on the first image that has it.
    pub example: String,
    pub dice: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorCount {
    pub model: String,
    pub dataset: String,
    pub rows: usize,
    pub examples: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub source: String,
    pub resolution: Resolution,
    pub empty_masks: EmptyMasks,
    /// The threshold each model's tables use: its study threshold (or `--threshold`), or
    /// the scored threshold nearest to it when the run scored others.
    pub table_thresholds: Vec<(String, f32)>,
    /// `--threshold` when the run gave one.
    pub threshold: Option<f32>,
    /// Each model's threshold (its study threshold unless `--threshold` was given).
    pub thresholds: Vec<(String, f32)>,
    pub nsd_tolerance: Option<f64>,
    pub finished: Option<bool>,
    pub rows: usize,
    pub models: Vec<String>,
    pub datasets: Vec<String>,
    pub prompts: Vec<String>,
    pub cells: Vec<Cell>,
    pub errors: Vec<ErrorCount>,
    /// Cells where the two empty-mask conventions differ.
    pub empty_masks_differ: Vec<empty::EmptyCell>,
    /// Dice vs threshold, when the run scored several.
    pub threshold_study: Option<thresholds::Study>,
    pub comparisons: Vec<compare::Comparison>,
    /// Control prompts against the entry's own prompt (`vlsm bench --prompt-controls`).
    pub controls: Vec<compare::Comparison>,
}

pub fn run(args: ReportArgs) -> Result<()> {
    let path = if args.results.is_dir() {
        args.results.join(RESULTS)
    } else {
        args.results.clone()
    };
    if !path.is_file() {
        bail!(
            "{}: no results file (run `vlsm bench` first)",
            path.display()
        );
    }
    let rows = results::read(&path, false)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let config = RunConfig::read(&dir).ok().flatten();
    if args.empty_masks == EmptyMasks::Nnunet && args.resolution == Resolution::Model {
        bail!(
            "--empty-masks nnunet needs pixel counts, which are recorded at the original resolution only"
        );
    }
    let options = Options {
        resolution: args.resolution,
        empty_masks: args.empty_masks,
    };
    let mut report = build(&rows, &path.display().to_string(), options, config.as_ref());
    if report.cells.is_empty() && report.errors.is_empty() {
        bail!("{} has no rows", path.display());
    }
    if let Some(p) = &args.prompt
        && !report.prompts.contains(p)
    {
        bail!(
            "--prompt {p}: the results have {}",
            report.prompts.join(", ")
        );
    }
    let tuning = match &args.tune_on {
        Some(val) => {
            let val_path = if val.is_dir() {
                val.join(RESULTS)
            } else {
                val.clone()
            };
            let val_rows = results::read(&val_path, false)
                .with_context(|| format!("--tune-on {}", val.display()))?;
            Some((val_path.display().to_string(), val_rows))
        }
        None => None,
    };
    report.threshold_study = thresholds::study(
        &rows,
        tuning.as_ref().map(|(p, r)| (p.as_str(), r.as_slice())),
        &report,
        options,
    )?;
    report.controls = compare::controls(&rows, &report, options);
    if let Some(pair) = &args.compare {
        let [a, b] = compare::pair(pair, "--compare")?;
        for name in [&a, &b] {
            if !report.models.contains(name) {
                bail!(
                    "--compare: no model {name} in the results (they have {})",
                    report.models.join(", ")
                );
            }
        }
        report
            .comparisons
            .extend(compare::models(&rows, &report, options, &a, &b));
    }
    if let Some(pair) = &args.compare_prompts {
        let [p, q] = compare::pair(pair, "--compare-prompts")?;
        for id in [&p, &q] {
            if !report.prompts.contains(id) {
                bail!(
                    "--compare-prompts: no prompt {id} in the results (they have {})",
                    report.prompts.join(", ")
                );
            }
        }
        report
            .comparisons
            .extend(compare::prompts(&rows, &report, options, &p, &q));
    }
    let out = args.out.unwrap_or(dir);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let md = markdown(&report, args.prompt.as_deref());
    crate::segment::write_atomic(&out.join("report.md"), md.as_bytes())?;
    let json = serde_json::to_vec_pretty(&report)?;
    crate::segment::write_atomic(&out.join("report.json"), &json)?;
    println!("{}", out.join("report.md").display());
    println!("{}", out.join("report.json").display());
    if args.nnunet_summary {
        for file in empty::nnunet_summaries(&rows, &report, &out)? {
            println!("{}", file.display());
        }
    }
    // Tables first: a missing font costs only the plots.
    for file in plot::dice_vs_prompt(&report, &out)? {
        println!("{}", file.display());
    }
    if let Some(study) = &report.threshold_study {
        for file in plot::dice_vs_threshold(study, &out)? {
            println!("{}", file.display());
        }
    }
    Ok(())
}

/// How rows become scores.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub resolution: Resolution,
    pub empty_masks: EmptyMasks,
}

/// Dice, IoU, HD95 and NSD of a row under the options (NaN Dice and IoU for an empty pair
/// under nnU-Net's convention).
fn metric(row: &Row, options: Options) -> [Option<f64>; 4] {
    let mut m = match options.resolution {
        Resolution::Original => [row.dice, row.iou, row.hd95, row.nsd],
        Resolution::Model => [row.dice_model, row.iou_model, row.hd95_model, row.nsd_model],
    };
    if options.empty_masks == EmptyMasks::Nnunet && empty::both_empty(row) {
        m[0] = Some(f64::NAN);
        m[1] = Some(f64::NAN);
    }
    m
}

/// Each image's score (the mean over a list-valued prompt's members; NaN when they are all
/// NaN), keyed by (split, entry).
fn per_image(
    rows: &[&Row],
    score: impl Fn(&Row) -> Option<f64>,
) -> BTreeMap<(String, Option<usize>), f64> {
    let mut members: BTreeMap<(String, Option<usize>), Vec<f64>> = BTreeMap::new();
    for r in rows {
        if let Some(v) = score(r) {
            members
                .entry((r.split.clone(), r.entry))
                .or_default()
                .push(v);
        }
    }
    members
        .into_iter()
        .map(|(k, v)| (k, mean_of(v.into_iter())))
        .collect()
}

/// The threshold each model's tables use: its configured threshold when the rows have it,
/// else the scored threshold nearest to it (0.5 without a bench.json).
fn table_thresholds(
    rows: &[Row],
    models: &[String],
    config: Option<&RunConfig>,
) -> Vec<(String, f32)> {
    models
        .iter()
        .map(|model| {
            let wanted = config
                .and_then(|c| c.models.iter().find(|m| &m.name == model))
                .map_or(0.5, |m| {
                    config.and_then(|c| c.threshold).unwrap_or(m.threshold())
                });
            let nearest = rows
                .iter()
                .filter(|r| &r.model == model)
                .map(|r| r.threshold)
                .min_by(|a, b| (a - wanted).abs().total_cmp(&(b - wanted).abs()))
                .unwrap_or(wanted);
            (model.clone(), nearest)
        })
        .collect()
}

/// Mean of the numbers, NaN if there are none.
fn mean_of(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.filter(|v| !v.is_nan()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub fn build(rows: &[Row], source: &str, options: Options, config: Option<&RunConfig>) -> Report {
    let resolution = options.resolution;
    // Orders: models and datasets as they first appear, prompts numerically.
    let mut models: Vec<String> = Vec::new();
    let mut datasets: Vec<String> = Vec::new();
    let mut prompts: Vec<String> = Vec::new();
    for r in rows {
        if !models.contains(&r.model) {
            models.push(r.model.clone());
        }
        if !datasets.contains(&r.dataset) {
            datasets.push(r.dataset.clone());
        }
        // Control prompts (`ctl-…`) have their own section, not columns of the tables.
        if !r.prompt_id.is_empty()
            && !r.prompt_id.starts_with("ctl-")
            && !prompts.contains(&r.prompt_id)
        {
            prompts.push(r.prompt_id.clone());
        }
    }
    prompts.sort_by_key(|p| (prompt_number(p), p.clone()));
    let table_thresholds = table_thresholds(rows, &models, config);
    let at_table_threshold = |r: &Row| {
        table_thresholds
            .iter()
            .any(|(m, t)| *m == r.model && *t == r.threshold)
    };

    type Key = (usize, usize, u32, String);
    let mut groups: BTreeMap<Key, Vec<&Row>> = BTreeMap::new();
    let mut errors: BTreeMap<(usize, usize), ErrorCount> = BTreeMap::new();
    for r in rows.iter().filter(|r| at_table_threshold(r)) {
        let m = models.iter().position(|x| *x == r.model).expect("listed");
        let d = datasets
            .iter()
            .position(|x| *x == r.dataset)
            .expect("listed");
        if !r.error.is_empty() {
            let e = errors.entry((m, d)).or_insert_with(|| ErrorCount {
                model: r.model.clone(),
                dataset: r.dataset.clone(),
                rows: 0,
                examples: Vec::new(),
            });
            e.rows += 1;
            if e.examples.len() < 5 && !e.examples.contains(&r.error) {
                e.examples.push(r.error.clone());
            }
            continue;
        }
        groups
            .entry((m, d, prompt_number(&r.prompt_id), r.prompt_id.clone()))
            .or_default()
            .push(r);
    }
    let mut cells = Vec::new();
    for ((m, d, _, prompt_id), rows) in groups {
        // Per image: the mean over the members evaluated.
        let mut per_image: BTreeMap<(&str, Option<usize>), Vec<&Row>> = BTreeMap::new();
        for r in &rows {
            per_image
                .entry((r.split.as_str(), r.entry))
                .or_default()
                .push(r);
        }
        let mut columns: [Vec<f64>; 4] = Default::default();
        for members in per_image.values() {
            for (k, column) in columns.iter_mut().enumerate() {
                column.push(mean_of(
                    members.iter().filter_map(|r| metric(r, options)[k]),
                ));
            }
        }
        let mut by_member: BTreeMap<usize, Vec<&Row>> = BTreeMap::new();
        for r in &rows {
            by_member.entry(r.member).or_default().push(r);
        }
        let members = if by_member.len() > 1 {
            by_member
                .into_iter()
                .map(|(member, rs)| MemberCell {
                    member,
                    example: rs[0].prompt.clone(),
                    dice: Summary::of(
                        &rs.iter()
                            .filter_map(|r| metric(r, options)[0])
                            .collect::<Vec<_>>(),
                    ),
                })
                .collect()
        } else {
            Vec::new()
        };
        cells.push(Cell {
            model: models[m].clone(),
            dataset: datasets[d].clone(),
            prompt_id,
            images: per_image.len(),
            dice: Summary::of(&columns[0]),
            iou: Summary::of(&columns[1]),
            hd95: Summary::of(&columns[2]),
            nsd: Summary::of(&columns[3]),
            members,
        });
    }
    let empty_masks_differ = empty::cells(rows, &table_thresholds, &datasets);
    Report {
        source: source.to_string(),
        resolution,
        empty_masks: options.empty_masks,
        table_thresholds,
        threshold: config.and_then(|c| c.threshold),
        thresholds: config
            .map(|c| {
                c.models
                    .iter()
                    .map(|m| (m.name.clone(), m.threshold()))
                    .collect()
            })
            .unwrap_or_default(),
        nsd_tolerance: config.map(|c| c.nsd_tolerance),
        finished: config.map(|c| c.finished),
        rows: rows.len(),
        models,
        datasets,
        prompts,
        cells,
        errors: errors.into_values().collect(),
        empty_masks_differ,
        threshold_study: None,
        comparisons: Vec::new(),
        controls: Vec::new(),
    }
}

impl Report {
    pub fn cell(&self, model: &str, dataset: &str, prompt: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.model == model && c.dataset == dataset && c.prompt_id == prompt)
    }
}

/// "89.51 ± 3.20" in percent; "–" when there is nothing.
fn percent(s: &Summary) -> String {
    if s.n == 0 {
        "–".into()
    } else if s.std.is_nan() {
        format!("{:.2}", s.mean * 100.0)
    } else {
        format!("{:.2} ± {:.2}", s.mean * 100.0, s.std * 100.0)
    }
}

fn interval(s: &Summary, scale: f64) -> String {
    if s.n == 0 {
        "–".into()
    } else {
        format!("[{:.2}, {:.2}]", s.ci_low * scale, s.ci_high * scale)
    }
}

fn plain(s: &Summary, scale: f64) -> String {
    if s.n == 0 {
        return "–".into();
    }
    let mut text = format!("{:.2}", s.mean * scale);
    if s.missing > 0 {
        let _ = write!(text, " ({} NaN)", s.missing);
    }
    text
}

pub fn markdown(report: &Report, prompt: Option<&str>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# vlsm benchmark report\n");
    let _ = writeln!(md, "- results: `{}` ({} rows)", report.source, report.rows);
    let _ = writeln!(
        md,
        "- metrics at the {} resolution; per image, list-valued prompts average their members; mean ± sample std over images, in %",
        match report.resolution {
            Resolution::Original => "original image",
            Resolution::Model => "model input",
        }
    );
    match report.threshold {
        Some(t) => {
            let _ = writeln!(
                md,
                "- threshold: sigmoid(logit) > {t} for every model (--threshold)"
            );
        }
        None if !report.thresholds.is_empty() => {
            let each: Vec<String> = report
                .thresholds
                .iter()
                .map(|(m, t)| format!("{m} {t}"))
                .collect();
            let _ = writeln!(
                md,
                "- threshold: sigmoid(logit) > each model's study threshold ({}; --threshold sets one for all)",
                each.join(", ")
            );
        }
        None => {}
    }
    if report.empty_masks == EmptyMasks::Nnunet {
        let _ = writeln!(
            md,
            "- empty masks: an empty prediction on an empty mask is undefined and left out (nnU-Net's convention; --empty-masks medvlsm scores it 1)"
        );
    }
    if let Some(t) = report.nsd_tolerance {
        let _ = writeln!(
            md,
            "- NSD tolerance: {t} px; HD95 in px (NaN when a mask is empty, left out of means)"
        );
    }
    if report.finished == Some(false) {
        let _ = writeln!(
            md,
            "- **the run has not finished**: rerun its `vlsm bench` command to complete it"
        );
    }
    let error_rows: usize = report.errors.iter().map(|e| e.rows).sum();
    let _ = writeln!(md, "- rows with errors: {error_rows}");

    let _ = writeln!(md, "\n## Dice (%): datasets × prompts\n");
    for model in &report.models {
        let _ = writeln!(md, "### {model}\n");
        let _ = writeln!(md, "| dataset | {} |", report.prompts.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(report.prompts.len()));
        for dataset in &report.datasets {
            let cells: Vec<String> = report
                .prompts
                .iter()
                .map(|p| {
                    report
                        .cell(model, dataset, p)
                        .map_or("–".into(), |c| percent(&c.dice))
                })
                .collect();
            let _ = writeln!(md, "| {dataset} | {} |", cells.join(" | "));
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "## Dice (%): models × datasets\n");
    let chosen: Vec<&String> = match prompt {
        Some(p) => report.prompts.iter().filter(|x| *x == p).collect(),
        None => report.prompts.iter().collect(),
    };
    for p in chosen {
        let _ = writeln!(md, "### {p}\n");
        let _ = writeln!(md, "| model | {} |", report.datasets.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(report.datasets.len()));
        for model in &report.models {
            let cells: Vec<String> = report
                .datasets
                .iter()
                .map(|d| {
                    report
                        .cell(model, d, p)
                        .map_or("–".into(), |c| percent(&c.dice))
                })
                .collect();
            let _ = writeln!(md, "| {model} | {} |", cells.join(" | "));
        }
        let _ = writeln!(md);
    }

    let nsd = report
        .nsd_tolerance
        .map_or("NSD".to_string(), |t| format!("NSD@{t}px"));
    let _ = writeln!(md, "## All metrics\n");
    let _ = writeln!(
        md,
        "| model | dataset | prompt | images | Dice % | Dice 95% CI | IoU % | HD95 px | {nsd} % |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for c in &report.cells {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.model,
            c.dataset,
            c.prompt_id,
            c.images,
            percent(&c.dice),
            interval(&c.dice, 100.0),
            percent(&c.iou),
            plain(&c.hd95, 1.0),
            plain(&c.nsd, 100.0),
        );
    }
    let listed: Vec<&Cell> = report
        .cells
        .iter()
        .filter(|c| !c.members.is_empty())
        .collect();
    if !listed.is_empty() {
        let _ = writeln!(md, "\n## List-valued prompts: Dice (%) per member\n");
        let _ = writeln!(
            md,
            "| model | dataset | prompt | member | Dice % | example |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for c in listed {
            for m in &c.members {
                let example: String = m.example.chars().take(80).collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.model,
                    c.dataset,
                    c.prompt_id,
                    m.member,
                    percent(&m.dice),
                    example.replace('|', "\\|")
                );
            }
        }
    }
    empty::markdown(report, &mut md);
    thresholds::markdown(report, &mut md);
    compare::controls_markdown(report, &mut md);
    compare::markdown(report, &mut md);
    if !report.errors.is_empty() {
        let _ = writeln!(md, "\n## Errors\n");
        let _ = writeln!(md, "| model | dataset | rows | first messages |");
        let _ = writeln!(md, "|---|---|---|---|");
        for e in &report.errors {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                e.model,
                e.dataset,
                e.rows,
                e.examples.join("; ").replace('|', "\\|")
            );
        }
    }
    md
}
